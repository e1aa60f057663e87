"""Generated detection scenes: coloured shapes on busy backgrounds.

The project trains its default models (``models/``) and checks exported copies
against them on these scenes, so everything here is deterministic: a scene is a
function of a ``numpy.random.Generator`` alone, and ``scenes(n, seed)[i]`` is
the same image whatever ``n`` is.

Boxes are tight: each object is rasterised into its own mask and its box is
that mask's pixel extent (``x1``/``y1`` exclusive). Objects lie wholly inside
the image, and a later object may hide at most a quarter of an earlier one.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

CLASSES = ("circle", "square", "triangle", "star")

#: Image side range in pixels (each side drawn independently).
MIN_SIDE, MAX_SIDE = 200, 480
#: ``write_yolo_dataset`` draws its validation split from ``seed + VAL_SEED_OFFSET``.
VAL_SEED_OFFSET = 1_000_000

_MAX_HIDDEN = 0.25  # largest share of an object that later objects may cover
_MIN_CONTRAST = 90.0  # RGB distance between an object and the pixels beneath it


@dataclass(frozen=True)
class Scene:
    """One generated image and its ground truth."""

    image: np.ndarray  # HxWx3 uint8 RGB
    boxes: np.ndarray  # (K,4) float32 xyxy pixels, x1/y1 exclusive
    classes: np.ndarray  # (K,) int64, index into CLASSES


def make_scene(rng: np.random.Generator, width: int | None = None, height: int | None = None) -> Scene:
    """Draw one scene of 1-6 shapes; sides default to a random size in [200, 480]."""
    width = int(width) if width is not None else int(rng.integers(MIN_SIDE, MAX_SIDE + 1))
    height = int(height) if height is not None else int(rng.integers(MIN_SIDE, MAX_SIDE + 1))
    canvas = _background(rng, width, height)
    if rng.random() < 0.5:
        _clutter(rng, canvas)

    owner = np.full((height, width), -1, dtype=np.int16)  # which object shows at each pixel
    areas: list[int] = []
    boxes: list[tuple[int, int, int, int]] = []
    classes: list[int] = []
    for _ in range(int(rng.integers(1, 7))):
        placed = _place(rng, canvas, owner, areas)
        if placed is None:
            continue
        cls, mask, fill = placed
        index = len(areas)
        canvas[mask] = fill
        owner[mask] = index
        areas.append(int(mask.sum()))
        ys, xs = np.nonzero(mask)
        boxes.append((int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1))
        classes.append(cls)

    if rng.random() < 0.3:  # sensor noise over everything
        noisy = canvas.astype(np.float32) + rng.normal(0.0, rng.uniform(2, 8), canvas.shape)
        canvas = np.clip(noisy, 0, 255).astype(np.uint8)
    return Scene(
        image=np.ascontiguousarray(canvas, dtype=np.uint8),
        boxes=np.asarray(boxes, dtype=np.float32).reshape(-1, 4),
        classes=np.asarray(classes, dtype=np.int64),
    )


def scenes(n: int, seed: int) -> list[Scene]:
    """``n`` scenes; scene ``i`` depends only on ``(seed, i)``."""
    return [make_scene(np.random.default_rng([seed, i])) for i in range(n)]


def write_yolo_dataset(root: Path, n_train: int, n_val: int, seed: int = 0) -> Path:
    """Write an Ultralytics dataset (PNG images, YOLO txt labels, data.yaml); return data.yaml.

    Train scenes are ``scenes(n_train, seed)``; val scenes are
    ``scenes(n_val, seed + VAL_SEED_OFFSET)``.
    """
    root = Path(root).resolve()
    for split, n, split_seed in (("train", n_train, seed), ("val", n_val, seed + VAL_SEED_OFFSET)):
        image_dir, label_dir = root / "images" / split, root / "labels" / split
        image_dir.mkdir(parents=True, exist_ok=True)
        label_dir.mkdir(parents=True, exist_ok=True)
        for i, scene in enumerate(scenes(n, split_seed)):
            Image.fromarray(scene.image).save(image_dir / f"{i:06d}.png", compress_level=1)
            (label_dir / f"{i:06d}.txt").write_text(yolo_labels(scene))
    data = root / "data.yaml"
    # JSON is valid YAML and keeps this module free of a yaml dependency.
    data.write_text(
        json.dumps(
            {
                "path": str(root),
                "train": str(root / "images" / "train"),
                "val": str(root / "images" / "val"),
                "nc": len(CLASSES),
                "names": list(CLASSES),
            },
            indent=2,
        )
        + "\n"
    )
    return data


def yolo_labels(scene: Scene) -> str:
    """A scene's boxes as YOLO label lines: ``class cx cy w h``, normalised."""
    h, w = scene.image.shape[:2]
    lines = []
    for (x0, y0, x1, y1), cls in zip(scene.boxes.tolist(), scene.classes.tolist()):
        lines.append(
            f"{cls} {(x0 + x1) / 2 / w:.6f} {(y0 + y1) / 2 / h:.6f} {(x1 - x0) / w:.6f} {(y1 - y0) / h:.6f}"
        )
    return "".join(line + "\n" for line in lines)


# --- drawing -----------------------------------------------------------------


def _random_colour(rng: np.random.Generator) -> np.ndarray:
    return rng.integers(0, 256, 3).astype(np.float32)


def _background(rng: np.random.Generator, width: int, height: int) -> np.ndarray:
    kind = rng.choice(["solid", "gradient", "noise"])
    if kind == "solid":
        image = np.broadcast_to(_random_colour(rng), (height, width, 3)).copy()
    elif kind == "gradient":
        angle = rng.uniform(0, 2 * math.pi)
        ys, xs = np.mgrid[0:height, 0:width].astype(np.float32)
        t = xs * math.cos(angle) + ys * math.sin(angle)
        t = (t - t.min()) / max(float(t.max() - t.min()), 1.0)
        image = _random_colour(rng) * (1 - t[..., None]) + _random_colour(rng) * t[..., None]
    else:  # smooth blotches, sometimes with grain
        grid = rng.integers(0, 256, (int(rng.integers(2, 9)), int(rng.integers(2, 9)), 3)).astype(np.uint8)
        image = np.asarray(Image.fromarray(grid).resize((width, height), Image.BILINEAR), dtype=np.float32)
        if rng.random() < 0.5:
            image = image + rng.normal(0.0, rng.uniform(5, 25), image.shape)
    return np.clip(image, 0, 255).astype(np.uint8)


def _clutter(rng: np.random.Generator, canvas: np.ndarray) -> None:
    """Random lines and arcs under the objects."""
    height, width = canvas.shape[:2]
    image = Image.fromarray(canvas)
    draw = ImageDraw.Draw(image)
    for _ in range(int(rng.integers(3, 16))):
        colour = tuple(int(c) for c in rng.integers(0, 256, 3))
        line_width = int(rng.integers(1, 4))
        x0, x1 = rng.uniform(0, width, 2)
        y0, y1 = rng.uniform(0, height, 2)
        if rng.random() < 0.7:
            draw.line([(x0, y0), (x1, y1)], fill=colour, width=line_width)
        else:
            bbox = [min(x0, x1), min(y0, y1), max(x0, x1) + 1, max(y0, y1) + 1]
            start = float(rng.uniform(0, 360))
            draw.arc(bbox, start, start + float(rng.uniform(30, 200)), fill=colour, width=line_width)
    canvas[:] = np.asarray(image)


def _polygon(rng: np.random.Generator, cls: int, size: float) -> list[tuple[float, float]] | None:
    """Vertices centred on the origin whose extent is about ``size``; None for circles."""
    if cls == 0:
        return None
    if cls == 1:  # square, upright half the time
        angle = 0.0 if rng.random() < 0.5 else rng.uniform(0, math.pi / 2)
        radius = size / 2 / (abs(math.cos(angle)) + abs(math.sin(angle))) * math.sqrt(2)
        angles = [angle + math.pi / 4 + k * math.pi / 2 for k in range(4)]
        radii = [radius] * 4
    elif cls == 2:  # roughly equilateral triangle
        angle = rng.uniform(0, 2 * math.pi)
        angles = [angle + k * 2 * math.pi / 3 + rng.uniform(-0.15, 0.15) for k in range(3)]
        radii = [size / 2 * rng.uniform(0.9, 1.0) for _ in range(3)]
    else:  # five-pointed star
        angle = rng.uniform(0, 2 * math.pi)
        inner = rng.uniform(0.38, 0.5)
        angles = [angle + k * math.pi / 5 for k in range(10)]
        radii = [size / 2 * (1.0 if k % 2 == 0 else inner) for k in range(10)]
    points = [(r * math.cos(a), r * math.sin(a)) for r, a in zip(radii, angles)]
    # Rescale so the larger side of the extent is ``size`` (triangles and stars are smaller).
    xs, ys = [p[0] for p in points], [p[1] for p in points]
    scale = size / max(max(xs) - min(xs), max(ys) - min(ys))
    return [(x * scale, y * scale) for x, y in points]


def _shape_mask(points, size: float, cx: float, cy: float, shape: tuple[int, int]) -> np.ndarray:
    mask = Image.new("L", (shape[1], shape[0]), 0)
    draw = ImageDraw.Draw(mask)
    if points is None:
        r = size / 2
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=255)
    else:
        draw.polygon([(cx + x, cy + y) for x, y in points], fill=255)
    return np.asarray(mask) > 0


def _place(rng: np.random.Generator, canvas: np.ndarray, owner: np.ndarray, areas: list[int]):
    """Try to put one shape on the canvas; return (class, mask, RGB pixels under mask) or None."""
    height, width = owner.shape
    short = min(width, height)
    cls = int(rng.integers(0, len(CLASSES)))
    size = float(rng.uniform(max(18.0, 0.1 * short), 0.45 * short))
    points = _polygon(rng, cls, size)
    outline = int(rng.integers(1, 4)) if rng.random() < 0.3 else 0
    for _ in range(20):
        margin = size / 2 + 2
        cx = float(rng.uniform(margin, width - margin))
        cy = float(rng.uniform(margin, height - margin))
        mask = _shape_mask(points, size, cx, cy, owner.shape)
        if not mask.any():
            continue
        covered = owner[mask]
        # Hidden share of each earlier object after this one lands: already hidden + newly hidden.
        if any(
            areas[j] - (owner == j).sum() + (covered == j).sum() > _MAX_HIDDEN * areas[j]
            for j in np.unique(covered)
            if j >= 0
        ):
            continue
        beneath = canvas[mask].astype(np.float32).mean(axis=0)
        pixels = np.broadcast_to(_contrasting_colour(rng, beneath), (int(mask.sum()), 3)).copy()
        if outline:  # a rim of another colour, inside the shape so the box stays the same
            eroded = Image.fromarray(mask.astype(np.uint8) * 255).filter(ImageFilter.MinFilter(2 * outline + 1))
            rim = ~(np.asarray(eroded) > 0)[mask]
            pixels[rim] = _contrasting_colour(rng, beneath)
        return cls, mask, pixels
    return None


def _contrasting_colour(rng: np.random.Generator, beneath: np.ndarray) -> np.ndarray:
    best, best_distance = None, -1.0
    for _ in range(30):
        colour = rng.integers(0, 256, 3).astype(np.float32)
        distance = float(np.linalg.norm(colour - beneath))
        if distance >= _MIN_CONTRAST:
            return colour.astype(np.uint8)
        if distance > best_distance:
            best, best_distance = colour, distance
    return best.astype(np.uint8)
