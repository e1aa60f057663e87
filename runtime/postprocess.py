"""Turn raw engine outputs into boxes on the original images.

YOLO: decode ``[N, 4 + nc, anchors]`` and run class-aware NMS for the whole
batch in one ``torchvision.ops.nms`` call (images and classes kept apart by
coordinate offsets, in float64 so the offsets cost no precision), then undo the
letterbox. The semantics are Ultralytics' ``non_max_suppression`` (best class
per anchor, ``score > conf``, ``max_nms`` candidates, ``max_det`` per image).
Faster R-CNN graphs already return per-image boxes in original pixels; they are
only filtered.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch
import torchvision

from detserve.runtime.preprocess import Geometry

MAX_WH = 7680  # Ultralytics' per-class offset; any box is smaller than this
MAX_NMS = 30000  # candidates per image kept for NMS, as Ultralytics


@dataclass(frozen=True)
class DetectParams:
    """Per-request detection settings. ``classes`` filters by class id."""

    conf: float = 0.25
    iou: float = 0.45
    max_det: int = 300
    classes: tuple[int, ...] | None = None
    agnostic: bool = False

    def __post_init__(self) -> None:
        if not 0.0 <= self.conf <= 1.0:
            raise ValueError(f"conf must be between 0 and 1, got {self.conf}")
        if not 0.0 <= self.iou <= 1.0:
            raise ValueError(f"iou must be between 0 and 1, got {self.iou}")
        if not (isinstance(self.max_det, int) and self.max_det >= 1):
            raise ValueError(f"max_det must be a positive integer, got {self.max_det}")


@dataclass
class Detections:
    """Boxes for one image: ``boxes`` xyxy in original pixels, ``class_ids`` as the manifest's label ids."""

    boxes: np.ndarray = field(default_factory=lambda: np.zeros((0, 4), np.float32))
    scores: np.ndarray = field(default_factory=lambda: np.zeros((0,), np.float32))
    class_ids: np.ndarray = field(default_factory=lambda: np.zeros((0,), np.int64))

    def __len__(self) -> int:
        return len(self.scores)


def yolo_nms(raw: np.ndarray, params: DetectParams) -> list[Detections]:
    """Decode and NMS a YOLO batch ``[N, 4 + nc, A]``; boxes stay in model-input pixels."""
    pred = torch.from_numpy(np.ascontiguousarray(raw))
    n_images = pred.shape[0]
    kept = yolo_nms_tensors(pred, params)
    out = [Detections() for _ in range(n_images)]
    if kept.images.numel() == 0:
        return out
    boxes_np, scores_np, cls_np = kept.boxes.numpy(), kept.scores.numpy(), kept.class_ids.numpy()
    images_np = kept.images.numpy()
    for i in np.unique(images_np):
        sel = images_np == i
        out[i] = Detections(boxes_np[sel], scores_np[sel], cls_np[sel])
    return out


@dataclass
class KeptBoxes:
    """The boxes NMS kept for a whole batch, as tensors on the batch's device, grouped by image in score order."""

    images: torch.Tensor  # [K] int64: the image each box belongs to
    boxes: torch.Tensor  # [K, 4] float32 xyxy, model-input pixels
    scores: torch.Tensor  # [K] float32
    class_ids: torch.Tensor  # [K] int64


def yolo_nms_tensors(raw: torch.Tensor, params: DetectParams) -> KeptBoxes:
    """``yolo_nms`` on a tensor ``[N, 4 + nc, A]`` on any device; the results stay there.

    The one YOLO NMS: the numpy path (:func:`yolo_nms`) and the device path
    (``detserve.runtime.device``) both call it, so their boxes cannot drift apart.
    """
    device = raw.device
    pred = raw.float().transpose(1, 2)  # [N, A, 4 + nc]
    n_images, _, width = pred.shape
    nc = width - 4
    scores, cls = pred[..., 4:].max(dim=-1)  # best class per anchor
    keep = scores > params.conf
    if params.classes is not None:
        keep &= torch.isin(cls, torch.tensor(params.classes, dtype=cls.dtype, device=device))
    image_idx, anchor_idx = keep.nonzero(as_tuple=True)
    if image_idx.numel() == 0:
        empty = torch.zeros(0, dtype=torch.int64, device=device)
        return KeptBoxes(empty, torch.zeros((0, 4), device=device), torch.zeros(0, device=device), empty)
    scores = scores[image_idx, anchor_idx]
    cls = cls[image_idx, anchor_idx]
    xywh = pred[image_idx, anchor_idx, :4]
    if image_idx.numel() > MAX_NMS:  # rare: cap each image at MAX_NMS best candidates
        order = _cap_per_image(image_idx, scores, MAX_NMS)
        image_idx, scores, cls, xywh = image_idx[order], scores[order], cls[order], xywh[order]
    boxes = torch.cat((xywh[:, :2] - xywh[:, 2:] / 2, xywh[:, :2] + xywh[:, 2:] / 2), dim=1)
    # One NMS call for the whole batch: shift each (image, class) group into its
    # own region so that groups never overlap.
    group_shift = (image_idx.double() * (nc + 1) + (0 if params.agnostic else cls.double())) * MAX_WH
    kept = torchvision.ops.nms(boxes.double() + group_shift[:, None], scores.double(), params.iou)
    kept_images = image_idx[kept]
    order = torch.sort(kept_images, stable=True).indices  # group by image, score order kept
    kept, kept_images = kept[order], kept_images[order]
    counts = torch.bincount(kept_images, minlength=n_images)
    starts = torch.cumsum(counts, 0) - counts
    rank = torch.arange(len(kept), device=device) - starts[kept_images]
    kept = kept[rank < params.max_det]
    return KeptBoxes(image_idx[kept], boxes[kept], scores[kept], cls[kept].to(torch.int64))


def _cap_per_image(image_idx: torch.Tensor, scores: torch.Tensor, cap: int) -> torch.Tensor:
    order = torch.argsort(scores, descending=True, stable=True)
    order = order[torch.sort(image_idx[order], stable=True).indices]
    counts = torch.bincount(image_idx[order])
    starts = torch.cumsum(counts, 0) - counts
    rank = torch.arange(len(order), device=order.device) - starts[image_idx[order]]
    return order[rank < cap]


def unletterbox(det: Detections, geometry: Geometry) -> Detections:
    """Map boxes from letterboxed input pixels back to the original image, clipped to it."""
    if not len(det):
        return det
    boxes = det.boxes.astype(np.float32, copy=True)
    boxes[:, [0, 2]] = (boxes[:, [0, 2]] - geometry.pad_x) / geometry.gain_x
    boxes[:, [1, 3]] = (boxes[:, [1, 3]] - geometry.pad_y) / geometry.gain_y
    return Detections(clip(boxes, geometry), det.scores, det.class_ids)


def clip(boxes: np.ndarray, geometry: Geometry) -> np.ndarray:
    boxes[:, [0, 2]] = boxes[:, [0, 2]].clip(0, geometry.orig_w)
    boxes[:, [1, 3]] = boxes[:, [1, 3]].clip(0, geometry.orig_h)
    return boxes


def filter_detections(det: Detections, params: DetectParams) -> Detections:
    """Apply conf, class filter and max_det to detections that are already NMSed and score-sorted."""
    keep = det.scores > params.conf
    if params.classes is not None:
        keep &= np.isin(det.class_ids, params.classes)
    idx = np.flatnonzero(keep)[: params.max_det]
    return Detections(det.boxes[idx].astype(np.float32), det.scores[idx].astype(np.float32), det.class_ids[idx].astype(np.int64))
