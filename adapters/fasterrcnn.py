"""Dataloop adapter for torchvision Faster R-CNN models served by detserve."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from detserve.adapters.base import DetectionAdapter, log
from detserve.adapters.dtlpy_data import read_subset
from detserve.runtime.images import decode


class FasterRCNNAdapter(DetectionAdapter):
    """``dl.BaseModelAdapter`` for Faster R-CNN: predict through detserve, train with a torchvision loop.

    Label ids follow torchvision: 0 is background, classes are 1..K.
    """

    family = "fasterrcnn"

    def load(self, local_path, **kwargs):
        super().load(local_path, **kwargs)
        floor = self.detector.manifest.output.min_score
        conf = self._config("conf_thres")
        if conf is not None and float(conf) < floor:
            log.warning("conf_thres %.3f is below the graph's box_score_thresh %.3f: boxes under it never leave the graph", float(conf), floor)

    def convert_from_dtlpy(self, data_path, **kwargs):
        """Nothing to convert: ``train`` reads dtlpy's layout (``<subset>/items`` + ``<subset>/json``) itself."""
        return Path(data_path)

    def train(self, data_path, output_path, **kwargs):
        """Fine-tune the loaded weights on the dtlpy download (train subset)."""
        from detserve.runtime.sources import build_fasterrcnn, read_fasterrcnn_checkpoint
        from detserve.training.recipes import fit_fasterrcnn

        manifest = self.detector.manifest
        ckpt = read_fasterrcnn_checkpoint(self.detector.folder / manifest.source.file, manifest.arch)
        model = build_fasterrcnn(
            ckpt.arch, ckpt.num_classes or len(self.labels) + 1, state_dict=ckpt.state_dict,
            min_size=manifest.input.min_size, max_size=manifest.input.max_size,
        )  # fmt: skip
        index = {name: i for i, name in self.labels.items()}
        samples = []
        for sample in read_subset(Path(data_path), "train"):
            keep = [i for i, label in enumerate(sample.labels) if label in index]
            image = decode(sample.image_path)
            classes = np.asarray([index[sample.labels[i]] for i in keep], np.int64)
            samples.append((image, sample.boxes[keep], classes))
        if not samples:
            raise ValueError(f"no training items under {data_path}/train/items")
        fit_fasterrcnn(model, samples, epochs=int(self._config("epochs", 5)), batch=int(self._config("train_batch_size", 4)))
        out = Path(output_path) / "weights.pth"
        out.parent.mkdir(parents=True, exist_ok=True)
        torch.save(
            {"arch": ckpt.arch, "labels": [self.labels[i] for i in sorted(self.labels)],
             "min_size": manifest.input.min_size, "max_size": manifest.input.max_size, "state_dict": model.state_dict()},
            out,
        )  # fmt: skip
        self.trained_weights = out
        return out
