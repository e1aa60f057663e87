"""Turn decoded RGB images into the tensor an artifact's input contract asks for.

One letterbox (Ultralytics' arithmetic, to the rounding, so that boxes match
``YOLO.predict``) and one batch packer. Faster R-CNN graphs resize and
normalise inside the graph, so their input is the 0-1 image itself.
"""

from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np

from detserve.manifest import InputSpec


@dataclass(frozen=True)
class Geometry:
    """How an original image maps into the model input: ``input = orig * gain + pad``."""

    orig_h: int
    orig_w: int
    gain_x: float = 1.0
    gain_y: float = 1.0
    pad_x: int = 0
    pad_y: int = 0


def letterbox(
    image: np.ndarray, size: int, pad_value: int = 114, rect: bool = False, stride: int = 32
) -> tuple[np.ndarray, Geometry]:
    """Resize keeping aspect ratio to fit ``size x size``, and pad, centred.

    ``rect=False`` pads to the full square; ``rect=True`` pads only to the next
    multiple of ``stride`` (the minimal rectangle), which is what
    ``YOLO.predict`` does for a single image (it sets ``rect=True``). Mirrors
    ``ultralytics.data.augment.LetterBox`` and the inverse in
    ``ultralytics.utils.ops.scale_boxes``: each side rounded, at least 1 px,
    padding split with Ultralytics' ``round(d - 0.1)`` rule, INTER_LINEAR.
    """
    h, w = image.shape[:2]
    r = min(size / h, size / w)
    new_w, new_h = max(round(w * r), 1), max(round(h * r), 1)
    dw, dh = size - new_w, size - new_h
    if rect:
        dw, dh = dw % stride, dh % stride
    dw, dh = dw / 2, dh / 2
    top, bottom = round(dh - 0.1), round(dh + 0.1)
    left, right = round(dw - 0.1), round(dw + 0.1)
    if (w, h) != (new_w, new_h):
        image = cv2.resize(image, (new_w, new_h), interpolation=cv2.INTER_LINEAR)
    out = cv2.copyMakeBorder(image, top, bottom, left, right, cv2.BORDER_CONSTANT, value=(pad_value,) * 3)
    # scale_boxes recomputes the gain per axis from the rounded sides.
    return out, Geometry(h, w, new_w / w, new_h / h, left, top)


def pack(images: list[np.ndarray], scale: float, dtype: np.dtype = np.float32) -> np.ndarray:
    """Stack same-size HxWx3 uint8 images into one NCHW float tensor, times ``scale``."""
    h, w = images[0].shape[:2]
    out = np.empty((len(images), 3, h, w), dtype=dtype)
    for i, image in enumerate(images):
        # One pass per image: HWC->CHW copy with the scale folded in.
        np.multiply(image.transpose(2, 0, 1), scale, out=out[i], casting="unsafe")
    return out


def prepare(images: list[np.ndarray], spec: InputSpec) -> tuple[list[np.ndarray], list[Geometry]]:
    """Apply the input contract's resize policy. Returns model-ready HxWx3 images and their geometry."""
    if spec.resize == "letterbox":
        assert spec.imgsz is not None
        boxed = [letterbox(image, spec.imgsz, spec.pad_value, spec.rect, spec.stride) for image in images]
        return [b[0] for b in boxed], [b[1] for b in boxed]
    # in_graph: the graph resizes, and maps boxes back to the size it was given.
    return list(images), [Geometry(image.shape[0], image.shape[1]) for image in images]
