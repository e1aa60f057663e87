"""torchvision Faster R-CNN as one batched module (dynamic N, H, W): the graph detserve exports and runs.

torchvision's own ONNX export unrolls the batch at trace time
(pytorch/vision#8937) and its proposal filtering and detection
post-processing loop over images in Python. :class:`BatchedFasterRCNN` wraps a
torchvision ``FasterRCNN`` (sharing its submodules and weights, unchanged) and
re-expresses every per-image step as batched tensor ops with fixed shapes, so
the traced graph takes ``[N, 3, H, W]`` with N, H, W all dynamic and returns
padded per-image detections.

Split of work (why it is where it is):

* :func:`resize_and_batch` (host side, torch CPU ops): uint8 -> 0-1 float,
  normalise, resize, zero-pad to a common multiple of 32. torchvision
  normalises *before* resizing and pads with 0 *after* normalising; doing the
  same ops in the same order here gives the graph bit-identical input to
  ``GeneralizedRCNNTransform`` (normalising in-graph after a 0-1 resize differs
  by rounding, and the zero padding would need a mask).
* the graph: backbone, RPN, RoI heads, and the final scaling of the boxes back
  to each image's original pixels (``transform.postprocess``), given the
  resized (unpadded) and original sizes of each image as inputs.

Semantics kept exactly as torchvision's eval forward on the same padded batch
(what ``model([img1, img2, ...])`` computes): RPN pre_nms_top_n per level per
image, sigmoid objectness, decode + clip to each image's own size,
remove_small_boxes(1e-3), score_thresh (>=), NMS per level, post_nms_top_n;
MultiScaleRoIAlign over the batch (rois carry their batch index), box head,
softmax, per-class decode, clip, drop background, box_score_thresh (>),
remove_small_boxes(1e-2), per-class NMS, detections_per_img.

How the per-image loops become fixed-shape tensor ops:

* top-k per level: the objectness of every level is padded with
  ``pre_nms_top_n`` entries of -inf (and zero deltas/anchors), so ``TopK`` has
  a constant k whatever H, W are; the padding can never win against a finite
  logit and is masked out afterwards.
* filtering never removes anything: it produces a validity mask.
* NMS: one ONNX ``NonMaxSuppression`` over the whole batch, using its own
  batch and class axes (RPN: batch = image, class = FPN level; detections:
  batch = (image, class) because the boxes are class-specific). Invalid
  candidates get score -1 and ``score_threshold`` -0.5 drops them.
  ``max_output_boxes_per_class`` is post_nms_top_n / detections_per_img,
  which cannot change the final top-k. torchvision's ``batched_nms`` separates
  classes with a coordinate offset when it has few boxes (<= 1000 on CPU) and
  runs per-class NMS otherwise; the offset changes float rounding of the IoU,
  so the same offsets are added here under the same condition (with classes
  already separated by the NMS class axis, the offset only reproduces the
  rounding).
* the kept indices are scattered back into a dense [N, M] mask, and the
  survivors are ranked with ``TopK`` (post_nms_top_n proposals per image,
  detections_per_img detections per image), padding with -inf so k is static.
* every image then has exactly post_nms_top_n proposals (the unused ones
  flagged invalid), so the RoI heads see ``N * post_nms_top_n`` rois.

Outputs: ``boxes [N, K, 4]`` (original-image pixels, zeros where padded),
``scores [N, K]`` (0 where padded), ``labels [N, K]`` int64 (-1 where padded),
``num_detections [N]`` int64; K = ``box_detections_per_img``; each image's
detections sorted by score, descending.
"""

from __future__ import annotations

import math
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F
import torchvision
from torch import Tensor
from torchvision.models.detection.rpn import permute_and_flatten
from torchvision.ops import roi_align
from torchvision.ops.poolers import LevelMapper

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

INPUT_NAMES = ["images", "image_sizes", "original_sizes"]
OUTPUT_NAMES = ["boxes", "scores", "labels", "num_detections"]

#: torchvision.ops.batched_nms switches from the coordinate-offset trick to
#: per-class NMS above this many box coordinates (boxes.numel()) on CPU
#: (100_000 on CUDA). The threshold only decides float rounding of the IoU.
TV_NMS_TRICK_MAX_NUMEL_CPU = 4000

_NEG_INF = float("-inf")
_INVALID_SCORE = -1.0  # score given to masked candidates before NMS
_NMS_SCORE_THRESHOLD = -0.5  # NonMaxSuppression keeps score > this: drops exactly the masked ones


# --------------------------------------------------------------------------- host-side preprocessing


def resize_and_batch(
    images: Sequence[np.ndarray],
    min_size: int,
    max_size: int,
    size_divisible: int = 32,
    *,
    image_mean: Sequence[float] = IMAGENET_MEAN,
    image_std: Sequence[float] = IMAGENET_STD,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``GeneralizedRCNNTransform`` (eval) for a list of HxWx3 uint8 RGB images.

    Returns ``(batch, image_sizes, original_sizes)``: ``batch`` float32
    ``[N, 3, H, W]`` *normalised* with ``image_mean``/``image_std`` and
    zero-padded (after normalisation, as torchvision does) to the batch's
    largest resized size rounded up to ``size_divisible``; ``image_sizes``
    int64 ``[N, 2]`` the resized, unpadded (h, w); ``original_sizes`` int64
    ``[N, 2]`` the input (h, w).

    Same torch ops in the same order as torchvision: ``/255``, normalise,
    bilinear ``interpolate(scale_factor=min(min_size/short, max_size/long),
    recompute_scale_factor=True)``, then ``batch_images``.
    """
    if len(images) == 0:
        raise ValueError("resize_and_batch needs at least one image")
    mean = torch.as_tensor(image_mean, dtype=torch.float32)[:, None, None]
    std = torch.as_tensor(image_std, dtype=torch.float32)[:, None, None]
    resized: list[Tensor] = []
    original_sizes = np.empty((len(images), 2), dtype=np.int64)
    with torch.inference_mode():
        for i, image in enumerate(images):
            if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
                raise ValueError(f"image {i}: expected an HxWx3 uint8 RGB array, got {image.dtype} {image.shape}")
            h, w = image.shape[:2]
            original_sizes[i] = (h, w)
            x = torch.from_numpy(np.ascontiguousarray(image.transpose(2, 0, 1))).float() / 255.0
            x = (x - mean) / std  # GeneralizedRCNNTransform.normalize
            scale = min(float(min_size) / min(h, w), float(max_size) / max(h, w))  # _resize_image_and_masks
            x = F.interpolate(
                x[None], size=None, scale_factor=scale, mode="bilinear", recompute_scale_factor=True, align_corners=False
            )[0]
            resized.append(x)
        # batch_images: zero padding to the max size, rounded up to size_divisible.
        stride = float(size_divisible)
        max_h = int(math.ceil(float(max(x.shape[1] for x in resized)) / stride) * stride)
        max_w = int(math.ceil(float(max(x.shape[2] for x in resized)) / stride) * stride)
        batch = torch.zeros((len(resized), 3, max_h, max_w), dtype=torch.float32)
        image_sizes = np.empty((len(images), 2), dtype=np.int64)
        for i, x in enumerate(resized):
            batch[i, :, : x.shape[1], : x.shape[2]].copy_(x)
            image_sizes[i] = (x.shape[1], x.shape[2])
    return batch.numpy(), image_sizes, original_sizes


# --------------------------------------------------------------------------- NMS (ONNX NonMaxSuppression semantics)


def _nms_eager(boxes: Tensor, scores: Tensor, max_output_per_class: int, iou_threshold: float, score_threshold: float) -> Tensor:
    """ONNX ``NonMaxSuppression`` in eager PyTorch (torchvision's nms kernel per batch/class).

    boxes ``[B, M, 4]`` (x1, y1, x2, y2), scores ``[B, C, M]`` -> selected ``[S, 3]``
    int64 rows ``(batch, class, box)``. Boxes with score <= score_threshold are ignored.
    """
    cand = scores > score_threshold
    rows: list[Tensor] = []
    for b, c in cand.any(dim=2).nonzero().tolist():
        idx = cand[b, c].nonzero().squeeze(1)
        keep = torchvision.ops.nms(boxes[b, idx], scores[b, c, idx], iou_threshold)[:max_output_per_class]
        k = idx[keep]
        rows.append(torch.stack((torch.full_like(k, b), torch.full_like(k, c), k), dim=1))
    if not rows:
        return torch.zeros((0, 3), dtype=torch.int64, device=boxes.device)
    return torch.cat(rows, 0)


class _BatchedNMS(torch.autograd.Function):
    """Eager: :func:`_nms_eager`. Exported: one ONNX ``NonMaxSuppression`` node."""

    @staticmethod
    def forward(ctx, boxes, scores, max_output_per_class: int, iou_threshold: float, score_threshold: float):  # type: ignore[override]
        return _nms_eager(boxes, scores, max_output_per_class, iou_threshold, score_threshold)

    @staticmethod
    def symbolic(g, boxes, scores, max_output_per_class, iou_threshold, score_threshold):
        return g.op(
            "NonMaxSuppression",
            boxes,
            scores,
            g.op("Constant", value_t=torch.tensor([int(max_output_per_class)], dtype=torch.int64)),
            g.op("Constant", value_t=torch.tensor([float(iou_threshold)], dtype=torch.float32)),
            g.op("Constant", value_t=torch.tensor([float(score_threshold)], dtype=torch.float32)),
            center_point_box_i=0,
        )


def _batched_nms(boxes: Tensor, scores: Tensor, max_output_per_class: int, iou_threshold: float) -> Tensor:
    if torch.jit.is_tracing():
        return _BatchedNMS.apply(boxes, scores, max_output_per_class, iou_threshold, _NMS_SCORE_THRESHOLD)
    return _nms_eager(boxes, scores, max_output_per_class, iou_threshold, _NMS_SCORE_THRESHOLD)


# --------------------------------------------------------------------------- helpers


def _clip_to_sizes(boxes: Tensor, sizes_hw: Tensor) -> Tensor:
    """``clip_boxes_to_image`` per image: boxes ``[N, ..., 4]``, sizes ``[N, 2]`` (h, w)."""
    shape = (-1,) + (1,) * (boxes.dim() - 2)
    h = sizes_hw[:, 0].to(boxes.dtype).reshape(shape)
    w = sizes_hw[:, 1].to(boxes.dtype).reshape(shape)
    zero = torch.zeros((), dtype=boxes.dtype, device=boxes.device)
    x = torch.min(torch.max(boxes[..., 0::2], zero), w[..., None])
    y = torch.min(torch.max(boxes[..., 1::2], zero), h[..., None])
    return torch.stack((x, y), dim=-1).flatten(-2)  # back to x1, y1, x2, y2


def _not_small(boxes: Tensor, min_size: float) -> Tensor:
    """``remove_small_boxes`` as a mask."""
    ws = boxes[..., 2] - boxes[..., 0]
    hs = boxes[..., 3] - boxes[..., 1]
    return (ws >= min_size) & (hs >= min_size)


def _tv_nms_offsets(boxes: Tensor, classes: Tensor, valid: Tensor, max_numel: int) -> Tensor:
    """The offsets torchvision's ``batched_nms`` would add (per image), else 0.

    boxes ``[N, M, 4]``, classes/valid ``[N, M]``; returns ``[N, M]``. With
    ``numel <= max_numel`` torchvision shifts class c by ``c * (max + 1)``
    (max over that image's surviving coordinates), else it runs per-class NMS
    on the raw boxes.
    """
    count = valid.sum(dim=1)
    masked = torch.where(valid[..., None], boxes, torch.full_like(boxes, _NEG_INF))
    maxc = masked.flatten(1).max(dim=1).values
    maxc = torch.where(count > 0, maxc, torch.zeros_like(maxc))
    one = torch.ones((), dtype=boxes.dtype, device=boxes.device)
    offsets = classes.to(boxes.dtype) * (maxc + one)[:, None]
    use_trick = (count * 4 <= max_numel)[:, None]
    return torch.where(use_trick, offsets, torch.zeros_like(offsets))


def _topk_padded(scores: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """``topk(k, dim=1)`` with -inf padding so that k never exceeds the row length."""
    pad = torch.full_like(scores[:, :1], _NEG_INF).expand(-1, k)
    return torch.cat((scores, pad), dim=1).topk(k, dim=1)


def _gather_rows(x: Tensor, idx: Tensor) -> Tensor:
    """x ``[N, M, D]``, idx ``[N, K]`` -> ``[N, K, D]``."""
    return torch.gather(x, 1, idx[..., None].expand(-1, -1, x.shape[-1]))


# --------------------------------------------------------------------------- the module


class BatchedFasterRCNN(torch.nn.Module):
    """A torchvision ``FasterRCNN`` (eval) re-expressed with batched, fixed-shape post-processing.

    ``forward(images, image_sizes, original_sizes=None)``:

    * ``images`` float32 ``[N, 3, H, W]``: normalised, zero-padded batch as made by
      :func:`resize_and_batch` (H, W multiples of 32);
    * ``image_sizes`` int64 ``[N, 2]``: each image's resized, unpadded (h, w);
    * ``original_sizes`` int64 ``[N, 2]``: each image's original (h, w); boxes come
      back in those pixels (``None``: in resized pixels, as roi_heads returns them).

    Returns ``(boxes [N, K, 4], scores [N, K], labels [N, K] int64, num_detections [N] int64)``.
    The wrapped model's modules and thresholds are used as they are; change
    ``model.roi_heads.score_thresh`` etc. before wrapping.
    """

    def __init__(
        self, model: torch.nn.Module, *, nms_trick_max_numel: int = TV_NMS_TRICK_MAX_NUMEL_CPU, dense_roi_levels: bool = False
    ):
        super().__init__()
        model = model.eval()
        rpn, heads, transform = model.rpn, model.roi_heads, model.transform
        if getattr(heads, "mask_roi_pool", None) is not None or getattr(heads, "keypoint_roi_pool", None) is not None:
            raise ValueError("BatchedFasterRCNN supports box-only Faster R-CNN models (no mask / keypoint heads)")
        self.backbone = model.backbone
        self.rpn_head = rpn.head
        self.anchor_generator = rpn.anchor_generator
        self.box_head = heads.box_head
        self.box_predictor = heads.box_predictor
        self.rpn_box_coder = rpn.box_coder
        self.roi_box_coder = heads.box_coder
        self.pre_nms_top_n = int(rpn._pre_nms_top_n["testing"])
        self.post_nms_top_n = int(rpn._post_nms_top_n["testing"])
        self.rpn_nms_thresh = float(rpn.nms_thresh)
        self.rpn_score_thresh = float(rpn.score_thresh)
        self.rpn_min_size = float(rpn.min_size)
        self.box_score_thresh = float(heads.score_thresh)
        self.box_nms_thresh = float(heads.nms_thresh)
        self.detections_per_img = int(heads.detections_per_img)
        self.num_classes = int(self.box_predictor.cls_score.out_features)
        self.nms_trick_max_numel = int(nms_trick_max_numel)
        self.dense_roi_levels = bool(dense_roi_levels)
        # What the caller's preprocessing must do (resize_and_batch arguments).
        self.image_mean = tuple(float(v) for v in transform.image_mean)
        self.image_std = tuple(float(v) for v in transform.image_std)
        self.min_size = int(transform.min_size[-1])
        self.max_size = int(transform.max_size)
        self.size_divisible = int(transform.size_divisible)
        if transform.fixed_size is not None:
            raise ValueError("models with a fixed_size transform are not supported")
        # MultiScaleRoIAlign: feature names, output size, and the scales it would infer.
        pool = heads.box_roi_pool
        self.featmap_names = list(pool.featmap_names)
        self.pool_output_size = tuple(int(v) for v in pool.output_size)
        self.sampling_ratio = int(pool.sampling_ratio)
        self.pool_scales, self.level_mapper = self._pool_scales(pool)

    def prepare(self, images: Sequence[np.ndarray]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """:func:`resize_and_batch` with this model's sizes, mean and std: the graph's three inputs."""
        return resize_and_batch(
            images, self.min_size, self.max_size, self.size_divisible, image_mean=self.image_mean, image_std=self.image_std
        )

    @torch.no_grad()
    def _pool_scales(self, pool) -> tuple[list[float], LevelMapper]:
        if pool.scales is not None and pool.map_levels is not None:
            return list(pool.scales), pool.map_levels
        from torchvision.ops.poolers import _filter_input, _setup_scales

        side = int(math.ceil(self.min_size / self.size_divisible) * self.size_divisible)
        param = next(self.backbone.parameters())
        feats = self.backbone(torch.zeros(1, 3, side, side, dtype=param.dtype, device=param.device))
        scales, mapper = _setup_scales(_filter_input(feats, self.featmap_names), [(side, side)], pool.canonical_scale, pool.canonical_level)
        return list(scales), mapper

    # ---------------------------------------------------------------- RPN

    def _anchors(self, images: Tensor, features: list[Tensor]) -> list[Tensor]:
        """AnchorGenerator.forward, once for the batch (every image shares the padded size)."""
        grid_sizes = [f.shape[-2:] for f in features]
        image_size = images.shape[-2:]
        dtype, device = features[0].dtype, features[0].device
        strides = [
            [
                torch.empty((), dtype=torch.int64, device=device).fill_(image_size[0] // g[0]),
                torch.empty((), dtype=torch.int64, device=device).fill_(image_size[1] // g[1]),
            ]
            for g in grid_sizes
        ]
        self.anchor_generator.set_cell_anchors(dtype, device)
        return self.anchor_generator.grid_anchors(grid_sizes, strides)

    def _proposals(self, images: Tensor, image_sizes: Tensor, features: list[Tensor]) -> tuple[Tensor, Tensor]:
        """RPN proposals, ``[N, post_nms_top_n, 4]`` and their validity ``[N, post_nms_top_n]``."""
        objectness, deltas = self.rpn_head(features)
        anchors = self._anchors(images, features)
        pre = self.pre_nms_top_n
        boxes_l, logits_l, levels_l = [], [], []
        for level, (obj, dlt, anc) in enumerate(zip(objectness, deltas, anchors)):
            n, a4, h, w = dlt.shape
            ob = permute_and_flatten(obj, n, a4 // 4, 1, h, w).flatten(1)  # [N, n_l]
            dl = permute_and_flatten(dlt, n, a4 // 4, 4, h, w)  # [N, n_l, 4]
            # pad so TopK(k=pre) is always defined: -inf objectness, zero deltas / anchors
            vals, idx = _topk_padded(ob, pre)
            dl = torch.cat((dl, torch.zeros_like(dl[:, :1]).expand(-1, pre, -1)), dim=1)
            anc = torch.cat((anc, anc.new_zeros((pre, 4))), dim=0)
            d_sel = _gather_rows(dl, idx)
            a_sel = anc[idx]
            boxes = self.rpn_box_coder.decode_single(d_sel.reshape(-1, 4), a_sel.reshape(-1, 4)).reshape(-1, pre, 4)
            boxes_l.append(boxes)
            logits_l.append(vals)
            levels_l.append(torch.full_like(idx, level))
        boxes = torch.cat(boxes_l, 1)  # [N, M, 4], M = L * pre
        logits = torch.cat(logits_l, 1)
        levels = torch.cat(levels_l, 1)
        valid = logits > _NEG_INF  # padding
        scores = torch.sigmoid(logits)
        boxes = _clip_to_sizes(boxes, image_sizes)
        valid = valid & _not_small(boxes, self.rpn_min_size) & (scores >= self.rpn_score_thresh)

        # NMS per image (batch axis) per level (class axis)
        num_levels = len(boxes_l)
        nms_boxes = boxes + _tv_nms_offsets(boxes, levels, valid, self.nms_trick_max_numel)[..., None]
        invalid = torch.full_like(scores, _INVALID_SCORE)
        nms_scores = torch.stack([torch.where(valid & (levels == lv), scores, invalid) for lv in range(num_levels)], 1)
        sel = _batched_nms(nms_boxes, nms_scores, self.post_nms_top_n, self.rpn_nms_thresh)
        m = boxes.shape[1]
        kept = self._kept_mask(scores, sel[:, 0] * m + sel[:, 2])
        top_scores, top_idx = _topk_padded(torch.where(kept, scores, torch.full_like(scores, _NEG_INF)), self.post_nms_top_n)
        boxes = torch.cat((boxes, torch.zeros_like(boxes[:, :1]).expand(-1, self.post_nms_top_n, -1)), 1)
        return _gather_rows(boxes, top_idx), top_scores > _NEG_INF

    @staticmethod
    def _kept_mask(like: Tensor, flat_idx: Tensor) -> Tensor:
        """Dense bool mask shaped like ``like`` ([N, M]) with ``flat_idx`` (into N*M) set."""
        flat = torch.zeros_like(like).reshape(-1)
        flat = flat.scatter(0, flat_idx, torch.ones_like(flat_idx, dtype=like.dtype))
        return flat.reshape(like.shape) > 0

    # ---------------------------------------------------------------- RoI heads

    def _roi_pool(self, features: dict[str, Tensor], rois: Tensor, boxes: Tensor) -> Tensor:
        """MultiScaleRoIAlign on rois ``[R, 5]`` (batch index, x1, y1, x2, y2)."""
        x = [v for k, v in features.items() if k in self.featmap_names]
        if len(x) == 1:
            return roi_align(x[0], rois, self.pool_output_size, self.pool_scales[0], self.sampling_ratio)
        levels = self.level_mapper([boxes])
        reachable = self.level_mapper.k_max - self.level_mapper.k_min + 1
        if reachable == 1:  # e.g. mobilenet FPNs: both maps have stride 32, every roi maps to level 0
            return roi_align(x[0], rois, self.pool_output_size, self.pool_scales[0], self.sampling_ratio)
        if self.dense_roi_levels:  # no NonZero (TensorRT-friendlier), at the price of pooling every roi at every level
            result = None
            for level in range(min(reachable, len(x))):
                pooled = roi_align(x[level], rois, self.pool_output_size, self.pool_scales[level], self.sampling_ratio)
                result = pooled if result is None else torch.where((levels == level)[:, None, None, None], pooled, result)
            return result
        # per level: pool that level's rois; then put the rows back in roi order with one Gather
        # (an inverse permutation) rather than scattering feature maps (slow in onnxruntime).
        order, pooled = [], []
        for level in range(min(reachable, len(x))):
            idx = torch.where(levels == level)[0]
            pooled.append(roi_align(x[level], rois[idx], self.pool_output_size, self.pool_scales[level], self.sampling_ratio))
            order.append(idx)
        perm = torch.cat(order)  # every roi is in exactly one level (the mapper clamps)
        inverse = torch.zeros_like(perm).scatter(0, perm, torch.arange(perm.shape[0], device=perm.device))
        return torch.cat(pooled)[inverse]

    def _detections(self, features, proposals: Tensor, prop_valid: Tensor, image_sizes: Tensor):
        p, c = self.post_nms_top_n, self.num_classes
        flat_boxes = proposals.reshape(-1, 4)
        batch_idx = torch.arange(proposals.shape[0], device=proposals.device)[:, None].expand(-1, p).reshape(-1, 1)
        rois = torch.cat((batch_idx.to(flat_boxes.dtype), flat_boxes), 1)
        box_features = self.box_head(self._roi_pool(features, rois, flat_boxes))
        class_logits, box_regression = self.box_predictor(box_features)

        boxes = self.roi_box_coder.decode_single(box_regression, flat_boxes).reshape(-1, p, c, 4)
        scores = F.softmax(class_logits, -1).reshape(-1, p, c)
        boxes = _clip_to_sizes(boxes, image_sizes)
        boxes, scores = boxes[:, :, 1:], scores[:, :, 1:]  # drop background
        labels = torch.arange(1, c, dtype=torch.int64, device=boxes.device).view(1, 1, -1).expand_as(scores)
        valid = prop_valid[..., None] & (scores > self.box_score_thresh) & _not_small(boxes, 1e-2)

        # NMS per (image, class): boxes are class-specific, so the NMS batch axis is image x class
        nc = c - 1
        offsets = _tv_nms_offsets(boxes.reshape(-1, p * nc, 4), labels.reshape(-1, p * nc), valid.reshape(-1, p * nc), self.nms_trick_max_numel)
        nms_boxes = (boxes + offsets.reshape(-1, p, nc)[..., None]).permute(0, 2, 1, 3).reshape(-1, p, 4)
        nms_scores = torch.where(valid, scores, torch.full_like(scores, _INVALID_SCORE)).permute(0, 2, 1).reshape(-1, 1, p)
        sel = _batched_nms(nms_boxes, nms_scores, self.detections_per_img, self.box_nms_thresh)
        flat_scores = scores.reshape(-1, p * nc)  # proposal-major, class-minor: torchvision's order
        b = sel[:, 0]
        kept = self._kept_mask(flat_scores, (b // nc) * (p * nc) + sel[:, 2] * nc + (b % nc))

        k = self.detections_per_img
        top_scores, top_idx = _topk_padded(torch.where(kept, flat_scores, torch.full_like(flat_scores, _NEG_INF)), k)
        boxes = boxes.reshape(-1, p * nc, 4)
        boxes = torch.cat((boxes, torch.zeros_like(boxes[:, :1]).expand(-1, k, -1)), 1)
        labels = labels.reshape(-1, p * nc)
        labels = torch.cat((labels, torch.zeros_like(labels[:, :1]).expand(-1, k)), 1)
        return _gather_rows(boxes, top_idx), top_scores, torch.gather(labels, 1, top_idx), top_scores > _NEG_INF

    # ---------------------------------------------------------------- forward

    def forward(self, images: Tensor, image_sizes: Tensor, original_sizes: Tensor | None = None):
        features = self.backbone(images)
        if isinstance(features, Tensor):
            features = {"0": features}
        proposals, prop_valid = self._proposals(images, image_sizes, list(features.values()))
        boxes, scores, labels, valid = self._detections(features, proposals, prop_valid, image_sizes)
        if original_sizes is not None:  # transform.postprocess / resize_boxes: ratio = original / resized
            ratio = original_sizes.to(boxes.dtype) / image_sizes.to(boxes.dtype)  # [N, 2] (h, w)
            rh, rw = ratio[:, 0, None], ratio[:, 1, None]
            boxes = torch.stack((boxes[..., 0] * rw, boxes[..., 1] * rh, boxes[..., 2] * rw, boxes[..., 3] * rh), dim=-1)
        boxes = torch.where(valid[..., None], boxes, torch.zeros_like(boxes))
        scores = torch.where(valid, scores, torch.zeros_like(scores))
        labels = torch.where(valid, labels, torch.full_like(labels, -1))
        return boxes, scores, labels, valid.sum(dim=1)
