"""Dataloop adapter for Ultralytics YOLO models served by detserve."""

from __future__ import annotations

import shutil
from pathlib import Path

from PIL import Image

from detserve.adapters.base import DetectionAdapter, log
from detserve.adapters.dtlpy_data import SUBSETS, read_subset


class YoloAdapter(DetectionAdapter):
    """``dl.BaseModelAdapter`` for YOLO: predict through detserve, train through Ultralytics."""

    family = "yolo"

    def convert_from_dtlpy(self, data_path, **kwargs):
        """Write the YOLO layout (images/, labels/, data.yaml) beside dtlpy's download."""
        data_path = Path(data_path)
        names = [self.labels[i] for i in sorted(self.labels)]
        index = {name: i for i, name in enumerate(names)}
        root = data_path / "yolo"
        for subset in SUBSETS:
            images_dir, labels_dir = root / "images" / subset, root / "labels" / subset
            images_dir.mkdir(parents=True, exist_ok=True)
            labels_dir.mkdir(parents=True, exist_ok=True)
            for n, sample in enumerate(read_subset(data_path, subset)):
                stem = f"{n:06d}_{sample.image_path.stem}"
                target = images_dir / f"{stem}{sample.image_path.suffix.lower()}"
                shutil.copyfile(sample.image_path, target)
                with Image.open(target) as im:
                    w, h = im.size
                lines = []
                for (x1, y1, x2, y2), label in zip(sample.boxes.tolist(), sample.labels):
                    if label not in index:
                        log.warning("%s: label %r is not one of the model's labels; skipped", sample.image_path.name, label)
                        continue
                    lines.append(f"{index[label]} {(x1 + x2) / 2 / w:.6f} {(y1 + y2) / 2 / h:.6f} {(x2 - x1) / w:.6f} {(y2 - y1) / h:.6f}")
                (labels_dir / f"{stem}.txt").write_text("\n".join(lines) + ("\n" if lines else ""))
        yaml = root / "data.yaml"
        yaml.write_text(
            f"path: {root}\ntrain: images/train\nval: images/validation\nnames:\n" + "".join(f"  {i}: {n}\n" for i, n in enumerate(names))
        )
        return yaml

    def train(self, data_path, output_path, **kwargs):
        """Fine-tune the loaded model's source weights with Ultralytics on the converted data."""
        from detserve.runtime.sources import load_yolo

        data_yaml = Path(data_path) / "yolo" / "data.yaml"
        if not data_yaml.is_file():
            data_yaml = self.convert_from_dtlpy(data_path)
        manifest = self.detector.manifest
        model = load_yolo(self.detector.folder / manifest.source.file)
        model.train(
            data=str(data_yaml),
            epochs=int(self._config("epochs", 10)),
            imgsz=int(self._config("imgsz", manifest.input.imgsz)),
            batch=int(self._config("train_batch_size", 16)),
            device=str(self._config("train_device", "cpu")),
            project=str(Path(output_path)),
            name="train",
            exist_ok=True,
            workers=0,
            amp=False,
            plots=False,
            verbose=False,
        )
        self.trained_weights = Path(model.trainer.best)
        return self.trained_weights
