"""The accuracy gate of a variant (int8): does it give the exact artifact's boxes, and the same mAP?

Two figures, both recorded in the manifest (``runtime.manifest.Gate``):

- agreement, always, on held-out images that did not calibrate the variant:
  the share of the exact artifact's boxes the variant finds (same class,
  IoU >= 0.9, both at the model's default score threshold), and the variant's
  boxes scored (COCO mAP) against the exact artifact's boxes taken as ground
  truth;
- with labelled images (``--val``): mAP50-95 and mAP50 of the exact artifact
  and of the variant; the gate fails when mAP50-95 drops by more than
  ``max_map_drop``.

Without labels the agreement decides: at least ``min_found_share`` of the exact
artifact's boxes found, on images where it found at least
:data:`MIN_REFERENCE_BOXES` boxes (fewer prove nothing).
"""

from __future__ import annotations

from typing import Callable, Sequence

import numpy as np

from detserve.runtime.manifest import Agreement, Gate, ValFigures
from detserve.runtime.postprocess import DetectParams, Detections
from detserve.training.datasets import LabelledImage
from detserve.training.metrics import ImageBoxes, coco_metrics

from detserve.export.parity import compare_all

#: Same class and IoU at least this: the variant "found" a box of the exact artifact. Looser than
#: parity's 0.99 (fp32 vs the source): int8 moves box edges by a pixel or so, which is not a miss.
AGREEMENT_IOU = 0.9
#: Without labels, the least share of the exact artifact's boxes the variant must find.
DEFAULT_MIN_FOUND_SHARE = 0.9
#: Default ``--max-map-drop``: half a point of mAP50-95.
DEFAULT_MAX_MAP_DROP = 0.005
#: Fewer boxes than this from the exact artifact on the agreement images prove nothing either way.
MIN_REFERENCE_BOXES = 20
#: The score threshold of mAP runs (as Ultralytics' val): the whole precision-recall curve.
MAP_CONF = 0.001

Detect = Callable[[np.ndarray, DetectParams], Detections]


def _boxes(det: Detections, labels: dict[int, str], scored: bool, hw: tuple[int, int]) -> ImageBoxes:
    return ImageBoxes(
        np.asarray(det.boxes, np.float64).reshape(-1, 4), [labels.get(int(c), str(c)) for c in det.class_ids],
        np.asarray(det.scores, np.float64) if scored else None, hw[1], hw[0],
    )  # fmt: skip


def agreement(
    reference: Detect, variant: Detect, images: Sequence[np.ndarray], params: DetectParams, labels: dict[int, str], source: str
) -> Agreement:
    """The variant against the exact artifact on ``images`` (no labels needed)."""
    ref = [reference(image, params) for image in images]
    got = [variant(image, params) for image in images]
    low = DetectParams(conf=min(MAP_CONF, params.conf), iou=params.iou, max_det=params.max_det)
    ranked = [variant(image, low) for image in images]
    matched = compare_all(ref, got, iou=AGREEMENT_IOU)
    names = [labels[k] for k in sorted(labels)]
    hws = [image.shape[:2] for image in images]
    scores = coco_metrics([_boxes(d, labels, False, hw) for d, hw in zip(ref, hws)], [_boxes(d, labels, True, hw) for d, hw in zip(ranked, hws)], names)
    return Agreement(
        images=len(images), source=source, conf=params.conf, iou=AGREEMENT_IOU, reference_boxes=matched.source_boxes,
        found_share=round(matched.matched_share, 6), map50_95=round(scores.map50_95, 6), map50=round(scores.map50, 6),
    )  # fmt: skip


def val_map(detect: Detect, data: Sequence[LabelledImage], params: DetectParams, labels: dict[int, str]):
    """COCO figures of ``detect`` on labelled images (``training.metrics``)."""
    names = [labels[k] for k in sorted(labels)]
    truth = [ImageBoxes(d.boxes, d.labels, None, d.image.shape[1], d.image.shape[0]) for d in data]
    predicted = [_boxes(detect(d.image, params), labels, True, d.image.shape[:2]) for d in data]
    return coco_metrics(truth, predicted, names)


def val_figures(reference: Detect, variant: Detect, data: Sequence[LabelledImage], params: DetectParams, labels: dict[int, str],
                source: str, reference_metrics=None) -> ValFigures:  # fmt: skip
    """mAP of the exact artifact (``reference_metrics`` when already measured) and of the variant on the same labelled images."""
    low = DetectParams(conf=MAP_CONF, iou=params.iou, max_det=params.max_det)
    ref = reference_metrics or val_map(reference, data, low, labels)
    got = val_map(variant, data, low, labels)
    return ValFigures(
        source=source, images=len(data), objects=ref.objects,
        reference_map50_95=round(ref.map50_95, 6), reference_map50=round(ref.map50, 6),
        map50_95=round(got.map50_95, 6), map50=round(got.map50, 6), drop=round(ref.map50_95 - got.map50_95, 6),
    )  # fmt: skip


def decide(
    agreed: Agreement, val: ValFigures | None, *, calibration: str, calibration_images: int,
    max_map_drop: float = DEFAULT_MAX_MAP_DROP, min_found_share: float = DEFAULT_MIN_FOUND_SHARE,
) -> Gate:  # fmt: skip
    """Pass or fail, with the reason in one line."""
    if val is not None:
        passed = val.drop <= max_map_drop
        reason = (
            f"mAP50-95 {val.map50_95:.4f} against {val.reference_map50_95:.4f} for the exact artifact on {val.images} labelled images "
            f"(drop {val.drop:+.4f}, {'within' if passed else 'beyond'} --max-map-drop {max_map_drop:g})"
        )
        basis = "val"
    else:
        basis = "agreement"
        if agreed.reference_boxes < MIN_REFERENCE_BOXES:
            passed = False
            reason = (
                f"the exact artifact found only {agreed.reference_boxes} boxes on the {agreed.images} agreement images, too few to "
                f"judge (at least {MIN_REFERENCE_BOXES}); give labelled images with --val"
            )
        else:
            passed = agreed.found_share >= min_found_share
            reason = (
                f"found {agreed.found_share:.1%} of the exact artifact's {agreed.reference_boxes} boxes (IoU >= {agreed.iou:g}, same class), "
                f"{'at least' if passed else 'below'} {min_found_share:.0%}; no labelled images (--val) to measure mAP"
            )
    return Gate(
        calibration=calibration, calibration_images=calibration_images, agreement=agreed, val=val, basis=basis,
        max_map_drop=max_map_drop, min_found_share=min_found_share, passed=passed, reason=reason,
    )  # fmt: skip
