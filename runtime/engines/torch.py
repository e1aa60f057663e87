"""PyTorch engine: the source model itself, eager. The reference, and the fallback backend.

It returns exactly what the exported graph returns, so the same post-processing
serves both.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from detserve.runtime.manifest import Manifest, verify_artifact
from detserve.runtime.sources import build_fasterrcnn, load_yolo, read_fasterrcnn_checkpoint


class TorchEngine:
    def __init__(self, folder: Path, manifest: Manifest, *, device: str = "cpu", threads: int = 1):
        path = verify_artifact(folder, manifest, which="source")
        if device == "cpu":
            # Oversubscribed torch collapses to seconds per image on 2 busy cores.
            torch.set_num_threads(max(1, threads))
        self.device = device
        self.name = f"torch-{device.split(':')[0]}"
        self.max_batch = manifest.batch.max
        self.family = manifest.family
        if manifest.family == "yolo":
            self.model = load_yolo(path).model.fuse().float().eval().to(device)
        else:
            from detserve.runtime.batched_rcnn import BatchedFasterRCNN

            ckpt = read_fasterrcnn_checkpoint(path, manifest.arch)
            # torchvision's own model: the reference (``.model``) ...
            self.model = build_fasterrcnn(
                ckpt.arch,
                ckpt.num_classes or len(manifest.labels) + 1,
                state_dict=ckpt.state_dict,
                min_size=manifest.input.min_size,
                max_size=manifest.input.max_size,
                box_score_thresh=manifest.output.min_score,
            ).to(device)
            # ... run as the exported graph runs it: one batched call, the same inputs and outputs.
            self.batched = BatchedFasterRCNN(self.model).eval()
        self.half = manifest.precision == "fp16" and device != "cpu"
        if self.half:
            self.model.half()

    @torch.inference_mode()
    def run(self, batch: np.ndarray, *extra: np.ndarray) -> list[np.ndarray]:
        x = torch.from_numpy(np.ascontiguousarray(batch)).to(self.device)
        x = x.half() if self.half else x.float()
        if self.family == "yolo":
            out = self.model(x)
            out = out[0] if isinstance(out, (list, tuple)) else out
            return [out.float().cpu().numpy()]
        sizes = [torch.from_numpy(np.ascontiguousarray(a)).to(self.device) for a in extra]
        return [t.float().cpu().numpy() if t.is_floating_point() else t.cpu().numpy() for t in self.batched(x, *sizes)]
