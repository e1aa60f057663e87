"""The images the benchmarks send: generated scenes (``detserve.training.synthetic``) encoded as files.

Generated pictures, not camera photos: at a photo's size, decoding one costs what a photo of that size
costs; the texture is not a camera's. Every generator is seeded, so a run sends the same bytes each time.
"""

from __future__ import annotations

import io
from typing import Any

import numpy as np

#: Photo sizes of the mixed workload: VGA, 1080p, 3, 6 and 12 MP (landscape; every fifth payload is each).
PHOTO_SIZES = ((640, 480), (1920, 1080), (2048, 1536), (3000, 2000), (4000, 3000))


def encode(image: np.ndarray, fmt: str = "JPEG", *, size: tuple[int, int] | None = None, resample: Any = None, **save: Any) -> bytes:
    """``image`` (HxWx3 uint8) as a file in ``fmt``, resized to ``size`` (width, height) first when given."""
    from PIL import Image

    picture = Image.fromarray(image)
    if size is not None:
        picture = picture.resize(size) if resample is None else picture.resize(size, resample)
    buffer = io.BytesIO()
    picture.save(buffer, format=fmt, **save)
    return buffer.getvalue()


def _scenes(n: int, seed: int) -> list[np.ndarray]:
    from detserve.training.synthetic import scenes

    return [scene.image for scene in scenes(n, seed)]


def jpeg_payloads(n: int = 32, seed: int = 7, quality: int = 90) -> list[bytes]:
    """``n`` generated scenes (200-480 px sides) as JPEG bytes: what every server and the baseline get."""
    return [encode(image, quality=quality) for image in _scenes(n, seed)]


def photo_payloads(n: int = 32, seed: int = 7, quality: int = 90) -> list[bytes]:
    """``n`` generated scenes resized to real photo sizes (VGA to 12 MP) in turn, as JPEG bytes."""
    from PIL import Image

    return [encode(image, size=PHOTO_SIZES[i % len(PHOTO_SIZES)], resample=Image.BILINEAR, quality=quality)
            for i, image in enumerate(_scenes(n, seed))]  # fmt: skip


def large_payloads(n: int, side: int, distinct: int = 8, seed: int = 11, quality: int = 75) -> list[bytes]:
    """``n`` large square JPEGs (``distinct`` generated scenes, scaled to ``side`` px, repeated): one large request's images."""
    images = [encode(image, size=(side, side), quality=quality) for image in _scenes(distinct, seed)]
    return [images[i % distinct] for i in range(n)]


def at_megapixels(image: np.ndarray, megapixels: float) -> tuple[int, int]:
    """(width, height) of ``image`` scaled to about ``megapixels``, aspect kept."""
    h, w = image.shape[:2]
    k = (megapixels * 1e6 / (h * w)) ** 0.5
    return round(w * k), round(h * k)
