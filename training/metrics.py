"""COCO detection metrics with pycocotools: the one place detserve scores boxes.

``coco_metrics(ground_truth, predictions, labels, conf_thres)`` takes plain
per-image boxes (xyxy pixels and label names), builds the COCO dicts, runs
``COCOeval(iouType="bbox")`` and returns a small :class:`DetectionMetrics`.
The Dataloop adapters' ``evaluate``, ``detserve evaluate`` and
``training.recipes.evaluate_map`` all call it.

Conventions (pinned by tests/test_lifecycle.py): image ids 1..N in input
order, annotation ids from 1 (pycocotools reads id 0 as "unmatched"),
category ids 1..K in ``labels`` order, ``bbox=[x, y, w, h]``, ``area=w*h``.
No predictions at all gives 0.0 for every figure (pycocotools' ``loadRes``
cannot take an empty list; an empty result set scores 0). A label with no
ground truth has AP ``None`` (pycocotools' -1).
"""

from __future__ import annotations

import contextlib
import io
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field

import numpy as np

#: ``COCOeval.stats`` in order, under the names the table and JSON use.
STAT_NAMES = (
    "mAP50-95", "mAP50", "mAP75", "mAP_small", "mAP_medium", "mAP_large",
    "AR1", "AR10", "AR100", "AR_small", "AR_medium", "AR_large",
)  # fmt: skip


@dataclass(frozen=True)
class ImageBoxes:
    """One image's boxes: xyxy pixels, label names, and scores for predictions (None for ground truth)."""

    boxes: np.ndarray  # (N, 4) float
    labels: list[str]
    scores: np.ndarray | None = None  # (N,)
    width: int = 0
    height: int = 0


@dataclass(frozen=True)
class DetectionMetrics:
    """COCO figures plus precision/recall of the boxes scoring at least ``conf_thres`` (IoU 0.5)."""

    map50_95: float
    map50: float
    stats: dict[str, float]  # all twelve COCOeval.stats, by STAT_NAMES
    per_label_ap: dict[str, float | None]  # AP50-95 per label; None: no ground truth for it
    per_label_ap50: dict[str, float | None]
    precision: float
    recall: float
    conf_thres: float
    images: int
    objects: int
    predictions: int
    extra: dict = field(default_factory=dict)

    def to_json(self) -> dict:
        return asdict(self)


def coco_dicts(
    ground_truth: Sequence[ImageBoxes], predictions: Sequence[ImageBoxes], labels: Sequence[str]
) -> tuple[dict, list[dict]]:
    """(COCO ground-truth dataset, COCO result list) for ``COCO()``/``loadRes``; unknown labels are dropped."""
    if len(ground_truth) != len(predictions):
        raise ValueError(f"{len(ground_truth)} ground-truth images but {len(predictions)} prediction entries")
    category = {name: i for i, name in enumerate(labels, start=1)}
    images, annotations, results = [], [], []
    for image_id, (gt, dt) in enumerate(zip(ground_truth, predictions), start=1):
        images.append({"id": image_id, "width": int(gt.width), "height": int(gt.height)})
        for (x0, y0, x1, y1), name in zip(np.asarray(gt.boxes, np.float64).reshape(-1, 4).tolist(), gt.labels):
            if name in category:
                w, h = x1 - x0, y1 - y0
                annotations.append(
                    {"id": len(annotations) + 1, "image_id": image_id, "category_id": category[name],
                     "bbox": [x0, y0, w, h], "area": w * h, "iscrowd": 0}
                )  # fmt: skip
        scores = np.ones(len(dt.labels)) if dt.scores is None else np.asarray(dt.scores, np.float64)
        for (x0, y0, x1, y1), name, score in zip(np.asarray(dt.boxes, np.float64).reshape(-1, 4).tolist(), dt.labels, scores.tolist()):
            if name in category:
                results.append({"image_id": image_id, "category_id": category[name], "bbox": [x0, y0, x1 - x0, y1 - y0], "score": score})
    categories = [{"id": i, "name": name} for name, i in category.items()]
    return {"images": images, "annotations": annotations, "categories": categories}, results


def coco_metrics(
    ground_truth: Sequence[ImageBoxes],
    predictions: Sequence[ImageBoxes],
    labels: Sequence[str],
    conf_thres: float = 0.0,
) -> DetectionMetrics:
    """COCO bbox metrics of ``predictions`` against ``ground_truth`` (same images, same order)."""
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    labels = list(labels)
    gt_dict, results = coco_dicts(ground_truth, predictions, labels)
    counts = {"images": len(gt_dict["images"]), "objects": len(gt_dict["annotations"]), "predictions": len(results)}
    if not results:
        zeros = {name: 0.0 for name in labels}
        return DetectionMetrics(0.0, 0.0, dict.fromkeys(STAT_NAMES, 0.0), zeros, dict(zeros), 0.0, 0.0, float(conf_thres), **counts)
    with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints its progress
        gt = COCO()
        gt.dataset = gt_dict
        gt.createIndex()
        evaluator = COCOeval(gt, gt.loadRes(results), iouType="bbox")
        evaluator.evaluate()
        evaluator.accumulate()
        evaluator.summarize()
    stats = {name: float(v) for name, v in zip(STAT_NAMES, evaluator.stats)}
    per_label_ap, per_label_ap50 = _per_label_ap(evaluator, labels)
    precision, recall = _precision_recall_at(evaluator, float(conf_thres))
    return DetectionMetrics(
        map50_95=stats["mAP50-95"], map50=stats["mAP50"], stats=stats,
        per_label_ap=per_label_ap, per_label_ap50=per_label_ap50,
        precision=precision, recall=recall, conf_thres=float(conf_thres), **counts,
    )  # fmt: skip


def _per_label_ap(evaluator, labels: list[str]) -> tuple[dict, dict]:
    # eval["precision"]: [T iou thresholds, R recall points, K categories, A area ranges, M max dets];
    # area "all" is index 0, maxDets=100 is the last, as in COCOeval.summarize.
    precision = evaluator.eval["precision"][:, :, :, 0, -1]
    ap, ap50 = {}, {}
    for k, name in enumerate(labels):
        at_all, at_50 = precision[:, :, k], precision[0, :, k]
        ap[name] = float(np.mean(at_all[at_all > -1])) if (at_all > -1).any() else None
        ap50[name] = float(np.mean(at_50[at_50 > -1])) if (at_50 > -1).any() else None
    return ap, ap50


def _precision_recall_at(evaluator, conf_thres: float) -> tuple[float, float]:
    """Precision and recall at IoU 0.5 of the detections scoring >= conf_thres, from COCOeval's own matching."""
    true_positive = detections = objects = 0
    all_area = evaluator.params.areaRng[0]
    for entry in evaluator.evalImgs:
        if entry is None or entry["aRng"] != all_area:
            continue
        keep = (np.asarray(entry["dtScores"]) >= conf_thres) & ~np.asarray(entry["dtIgnore"][0], bool)
        true_positive += int((np.asarray(entry["dtMatches"][0])[keep] > 0).sum())
        detections += int(keep.sum())
        objects += int((~np.asarray(entry["gtIgnore"], bool)).sum())
    return true_positive / max(detections, 1), true_positive / max(objects, 1)
