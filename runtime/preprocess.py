"""Turn decoded RGB images into the tensor an artifact's input contract asks for.

One letterbox (Ultralytics' arithmetic, to the rounding, so that boxes match
``YOLO.predict``) and one batch packer for YOLO; torchvision's own transform
arithmetic for Faster R-CNN (``batched_rcnn.resize_and_batch``). Each image is
prepared alone, as a batch of one, so its input never depends on the images
it is later batched with.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import cv2
import numpy as np

if TYPE_CHECKING:  # only for the annotation: the GPU check imports this module without pydantic
    from detserve.runtime.manifest import InputSpec


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
    new_w, new_h, top, bottom, left, right = letterbox_layout(h, w, size, rect, stride)
    if (w, h) != (new_w, new_h):
        image = cv2.resize(image, (new_w, new_h), interpolation=cv2.INTER_LINEAR)
    out = cv2.copyMakeBorder(image, top, bottom, left, right, cv2.BORDER_CONSTANT, value=(pad_value,) * 3)
    # scale_boxes recomputes the gain per axis from the rounded sides.
    return out, Geometry(h, w, new_w / w, new_h / h, left, top)


def letterbox_layout(h: int, w: int, size: int, rect: bool = False, stride: int = 32) -> tuple[int, int, int, int, int, int]:
    """``(new_w, new_h, top, bottom, left, right)``: the letterbox arithmetic alone, shared by the device path."""
    r = min(size / h, size / w)
    new_w, new_h = max(round(w * r), 1), max(round(h * r), 1)
    dw, dh = size - new_w, size - new_h
    if rect:
        dw, dh = dw % stride, dh % stride
    dw, dh = dw / 2, dh / 2
    top, bottom = round(dh - 0.1), round(dh + 0.1)
    left, right = round(dw - 0.1), round(dw + 0.1)
    return new_w, new_h, top, bottom, left, right


def pack(images: list[np.ndarray], scale: float, dtype: np.dtype = np.float32) -> np.ndarray:
    """Stack same-size HxWx3 uint8 images into one NCHW float tensor, times ``scale``."""
    h, w = images[0].shape[:2]
    out = np.empty((len(images), 3, h, w), dtype=dtype)
    for i, image in enumerate(images):
        # One pass per image: HWC->CHW copy with the scale folded in.
        np.multiply(image.transpose(2, 0, 1), scale, out=out[i], casting="unsafe")
    return out


@dataclass
class PreparedImage:
    """One image ready to be packed into a batch: everything per-image is done, nothing batch-wide yet.

    ``pixels`` is the letterboxed HxWx3 uint8 image (YOLO: 1 byte a value, so a
    queue of them stays small; the float conversion happens in ``pack``) or the
    normalised, resized, stride-padded ``1x3xHxW`` float tensor (Faster R-CNN);
    ``extra`` the further graph inputs of a batch of one (Faster R-CNN's resized
    and original sizes). Images with the same ``key`` can share an engine call.
    """

    pixels: np.ndarray
    geometry: Geometry
    extra: tuple[np.ndarray, ...] = ()

    @property
    def key(self) -> tuple[int, ...]:
        return self.pixels.shape


def prepare(image: np.ndarray, spec: InputSpec, full_hw: tuple[int, int] | None = None) -> PreparedImage:
    """Resize one decoded RGB image per the input contract, alone (never against its batch neighbours).

    ``full_hw``: the image's full size when ``image`` was decoded reduced
    (``images.decode_reduced``); the geometry then maps boxes back to the full size.
    """
    if spec.resize == "letterbox":
        assert spec.imgsz is not None
        boxed, geometry = letterbox(image, spec.imgsz, spec.pad_value, spec.rect, spec.stride)
        if full_hw is not None and full_hw != image.shape[:2]:
            (full_h, full_w), (h, w) = full_hw, image.shape[:2]
            geometry = Geometry(full_h, full_w, geometry.gain_x * w / full_w, geometry.gain_y * h / full_h, geometry.pad_x, geometry.pad_y)
        return PreparedImage(boxed, geometry)
    if full_hw is not None and full_hw != image.shape[:2]:
        raise ValueError("a reduced decode is for letterbox models only (Faster R-CNN's graph scales boxes from the pixels it gets)")
    # rcnn: torchvision's transform; the graph scales boxes back to the original itself.
    from detserve.runtime.batched_rcnn import resize_and_batch

    assert spec.min_size and spec.max_size and spec.mean and spec.std
    batch, sizes, originals = resize_and_batch([image], spec.min_size, spec.max_size, spec.stride, image_mean=spec.mean, image_std=spec.std)
    return PreparedImage(batch, Geometry(image.shape[0], image.shape[1]), (sizes, originals))


def pack_inputs(images: list[PreparedImage], spec: InputSpec) -> tuple[np.ndarray, ...]:
    """The engine inputs for same-key images: the one place a batch is packed."""
    if spec.resize == "letterbox":
        dtype = np.float16 if spec.dtype == "float16" else np.float32
        return (pack([p.pixels for p in images], spec.scale, dtype),)
    return tuple(np.concatenate(parts) for parts in zip(*((p.pixels, *p.extra) for p in images)))
