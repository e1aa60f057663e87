"""Labelled images from a folder, for scoring a model: YOLO txt labels or a COCO json file.

``read_labelled(folder, names)`` returns one :class:`LabelledImage` per image
(the decoded RGB pixels, xyxy boxes in pixels, label names). Two layouts:

- YOLO (Ultralytics): ``images/**/x.jpg`` with ``labels/**/x.txt`` (the
  Ultralytics convention: the ``images`` part of the path becomes
  ``labels``), or the ``.txt`` beside the image. A line is
  ``class cx cy w h``, normalised; ``class`` indexes ``names`` (the model's
  labels in class-id order). An image without a label file has no objects.
- COCO: one ``*.json`` in ``folder`` with ``images``, ``annotations`` and
  ``categories``; images at their ``file_name`` under ``folder`` or
  ``folder/images``. Categories match the model's labels by name; the others
  are dropped (and named in the error when none match).

``scene_set`` gives generated scenes in the same form (the default models'
held-out set).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff")


@dataclass(frozen=True)
class LabelledImage:
    image: np.ndarray  # HxWx3 uint8 RGB
    boxes: np.ndarray  # (K, 4) float64 xyxy pixels
    labels: list[str]
    name: str


def image_files(folder: Path) -> list[Path]:
    """Every image under ``folder``, sorted by path."""
    return sorted(p for p in Path(folder).rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)


def read_labelled(folder: str | Path, names: list[str]) -> list[LabelledImage]:
    """The labelled images of ``folder`` (COCO json if there is one, else YOLO txt); raises ValueError with the fix."""
    folder = Path(folder)
    if not folder.is_dir():
        raise ValueError(f"{folder} is not a folder of labelled images (YOLO txt labels, or a COCO json)")
    coco = sorted(folder.glob("*.json"))
    if len(coco) > 1:
        raise ValueError(f"{folder} holds {len(coco)} json files; keep the one COCO annotation file")
    images = read_coco(coco[0], names) if coco else read_yolo(folder, names)
    if not images:
        raise ValueError(f"no images under {folder}")
    if not any(len(i.labels) for i in images):
        raise ValueError(f"{folder}: none of its {len(images)} images has a labelled object of the model's classes ({', '.join(names)})")
    return images


def read_yolo(folder: Path, names: list[str]) -> list[LabelledImage]:
    from detserve.runtime.images import decode

    out = []
    for path in image_files(folder):
        image = decode(path)
        h, w = image.shape[:2]
        boxes, labels = [], []
        label_file = _yolo_label_file(path, folder)
        if label_file is not None:
            for number, line in enumerate(label_file.read_text().splitlines(), start=1):
                parts = line.split()
                if not parts:
                    continue
                if len(parts) < 5:
                    raise ValueError(f"{label_file}:{number}: expected 'class cx cy w h', got {line!r}")
                cls = int(float(parts[0]))
                if not 0 <= cls < len(names):
                    raise ValueError(f"{label_file}:{number}: class {cls} but the model has {len(names)} classes (0..{len(names) - 1})")
                cx, cy, bw, bh = (float(v) for v in parts[1:5])
                boxes.append(((cx - bw / 2) * w, (cy - bh / 2) * h, (cx + bw / 2) * w, (cy + bh / 2) * h))
                labels.append(names[cls])
        out.append(LabelledImage(image, np.asarray(boxes, np.float64).reshape(-1, 4), labels, str(path.relative_to(folder))))
    return out


def _yolo_label_file(image: Path, root: Path) -> Path | None:
    beside = image.with_suffix(".txt")
    if beside.is_file():
        return beside
    parts = list(image.relative_to(root).parts)
    if "images" in parts:
        parts[len(parts) - 1 - parts[::-1].index("images")] = "labels"
        mirrored = (root / Path(*parts)).with_suffix(".txt")
        if mirrored.is_file():
            return mirrored
    return None


def read_coco(path: Path, names: list[str]) -> list[LabelledImage]:
    from detserve.runtime.images import decode

    data = json.loads(path.read_text())
    categories = {c["id"]: c["name"] for c in data.get("categories", [])}
    known = {i: n for i, n in categories.items() if n in names}
    if categories and not known:
        raise ValueError(f"{path}: no COCO category is one of the model's classes ({', '.join(names)}); found {sorted(categories.values())}")
    by_image: dict[int, list[dict]] = {}
    for a in data.get("annotations", []):
        by_image.setdefault(a["image_id"], []).append(a)
    out = []
    for entry in sorted(data.get("images", []), key=lambda e: e["id"]):
        file = next((p for p in (path.parent / entry["file_name"], path.parent / "images" / entry["file_name"]) if p.is_file()), None)
        if file is None:
            raise ValueError(f"{path}: image {entry['file_name']!r} is neither in {path.parent} nor in {path.parent / 'images'}")
        boxes, labels = [], []
        for a in by_image.get(entry["id"], []):
            if a.get("iscrowd") or a["category_id"] not in known:
                continue
            x, y, w, h = a["bbox"]
            boxes.append((x, y, x + w, y + h))
            labels.append(known[a["category_id"]])
        out.append(LabelledImage(decode(file), np.asarray(boxes, np.float64).reshape(-1, 4), labels, entry["file_name"]))
    return out


def scene_set(n: int, seed: int) -> list[LabelledImage]:
    """Generated scenes (``synthetic.scenes(n, seed)``) as labelled images."""
    from detserve.training.synthetic import CLASSES, scenes

    return [
        LabelledImage(s.image, s.boxes.astype(np.float64), [CLASSES[int(c)] for c in s.classes], f"scene-{seed}-{i}")
        for i, s in enumerate(scenes(n, seed))
    ]
