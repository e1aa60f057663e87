"""Read the folder that dtlpy's ``prepare_data`` downloads: ``<subset>/items/...`` and ``<subset>/json/...``.

Each JSON is an item with its annotations; boxes are ``{"type": "box",
"label": name, "coordinates": [{"x": left, "y": top}, {"x": right, "y": bottom}]}``.
A box whose ``metadata.user.model`` is set is a model's prediction, not ground
truth (the rule dtlpymetrics uses).

dtlpy writes ``json/<dir>/<stem of the item's filename>.json``, but for a
*link* item it appends the link ref's extension to the image it saves
(``/train/a.png`` becomes ``items/train/a.png.png``, downloader.py), so the
JSON is found from the item's filename, not from the saved image's name.
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


def box_annotations(annotations: list[dict], model_name: str | None = None, min_side: float = 0.0):
    """(xyxy boxes (K,4) float64, labels, scores) of the box annotations.

    ``model_name=None``: the ground truth (boxes without ``metadata.user.model``);
    otherwise that model's predictions, scored by ``metadata.user.model.confidence``.
    Boxes narrower or shorter than ``min_side`` pixels are dropped.
    """
    boxes, labels, scores = [], [], []
    for ann in annotations:
        if ann.get("type") != "box":
            continue
        info = ((ann.get("metadata") or {}).get("user") or {}).get("model")
        if model_name is None:
            if info:  # a prediction is not ground truth
                continue
        elif not info or info.get("name") != model_name:
            continue
        (p1, p2) = ann["coordinates"][:2]
        left, right = sorted((float(p1["x"]), float(p2["x"])))
        top, bottom = sorted((float(p1["y"]), float(p2["y"])))
        if right - left < min_side or bottom - top < min_side:
            continue
        boxes.append((left, top, right, bottom))
        labels.append(str(ann["label"]))
        scores.append(float(info.get("confidence", 1.0)) if info else 1.0)
    return np.asarray(boxes, np.float64).reshape(-1, 4), labels, np.asarray(scores, np.float64)


def subset_json_for(items_dir: Path, json_dir: Path, image_path: Path) -> Path | None:
    """The item JSON of a downloaded image: ``json/<rel>.json``, or without a link item's doubled extension."""
    rel = image_path.relative_to(items_dir)
    candidates = [json_dir / rel.with_suffix(".json")]
    if Path(rel.stem).suffix.lower() in IMAGE_SUFFIXES:  # a.png.png (link item): the item is a.png
        candidates.append(json_dir / rel.with_suffix("").with_suffix(".json"))
    return next((c for c in candidates if c.is_file()), None)


def subset_items(data_path: Path, subset: str) -> list[tuple[Path, dict | None]]:
    """(image path, item JSON or None) for every image of a subset, sorted by path."""
    items_dir, json_dir = Path(data_path) / subset / "items", Path(data_path) / subset / "json"
    out = []
    for image_path in sorted(p for p in items_dir.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES):
        json_path = subset_json_for(items_dir, json_dir, image_path)
        out.append((image_path, json.loads(json_path.read_text()) if json_path is not None else None))
    return out


def read_subset(data_path: Path, subset: str, min_side: float = 1.0) -> list[BoxSample]:
    """Ground-truth box samples of one subset; items without a readable JSON are kept with no boxes (background)."""
    samples = []
    for image_path, item in subset_items(data_path, subset):
        boxes, labels, _ = box_annotations((item or {}).get("annotations", []), min_side=min_side)
        samples.append(BoxSample(image_path, boxes.astype(np.float32), labels))
    return samples
