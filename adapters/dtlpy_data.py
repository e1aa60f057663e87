"""Read the folder that dtlpy's ``prepare_data`` downloads: ``<subset>/items/...`` and ``<subset>/json/...``.

Each JSON is an item with its annotations; boxes are ``{"type": "box",
"label": name, "coordinates": [{"x": left, "y": top}, {"x": right, "y": bottom}]}``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

SUBSETS = ("train", "validation")
IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff"}


@dataclass(frozen=True)
class BoxSample:
    image_path: Path
    boxes: np.ndarray  # (K, 4) xyxy pixels
    labels: list[str]


def read_subset(data_path: Path, subset: str) -> list[BoxSample]:
    """Box samples of one subset; items without a readable JSON are kept with no boxes (background)."""
    items_dir, json_dir = Path(data_path) / subset / "items", Path(data_path) / subset / "json"
    samples = []
    for image_path in sorted(p for p in items_dir.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES):
        rel = image_path.relative_to(items_dir)
        json_path = json_dir / rel.with_suffix(".json")
        boxes, labels = [], []
        if json_path.is_file():
            for ann in json.loads(json_path.read_text()).get("annotations", []):
                if ann.get("type") != "box":
                    continue
                (p1, p2) = ann["coordinates"][:2]
                left, right = sorted((float(p1["x"]), float(p2["x"])))
                top, bottom = sorted((float(p1["y"]), float(p2["y"])))
                if right - left < 1 or bottom - top < 1:
                    continue
                boxes.append((left, top, right, bottom))
                labels.append(str(ann["label"]))
        samples.append(BoxSample(image_path, np.asarray(boxes, np.float32).reshape(-1, 4), labels))
    return samples
