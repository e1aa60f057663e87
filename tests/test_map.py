"""mAP of each default model, source vs exported artifact, on held-out generated scenes.

The export must not cost accuracy: at fp32 the artifact's mAP50-95 is within
0.5 point of the source model's (COCO mAP via pycocotools). The source runs as
users run it (Ultralytics predict, torchvision eval, one image at a time), the
artifact through detserve's runtime.
"""

from __future__ import annotations

import pytest

from detserve.runtime.detector import Detector
from detserve.training.synthetic import scenes as make_scenes
from detserve.training.recipes import EVAL_SEED, evaluate_map
from detserve.export.reference import source_reference

HELD_OUT = 40  # a slice of the held-out set models/README.md reports on (seed EVAL_SEED)


def predict_fn(detect, first_class: int):
    """detections -> the (boxes, scores, class index) triples evaluate_map takes."""
    return lambda images: [(d.boxes, d.scores, d.class_ids - first_class) for d in map(detect, images)]


@pytest.mark.parametrize("family,conf", [("yolo", 0.001), pytest.param("fasterrcnn", 0.05, marks=pytest.mark.slow)])
def test_exported_map_is_within_half_a_point_of_the_source(family, conf, request):
    folder = request.getfixturevalue(f"{family}_export")
    scenes = make_scenes(HELD_OUT, EVAL_SEED)
    artifact = Detector(folder, backend="onnxruntime", device="cpu")
    params = artifact.params(conf=conf, iou=0.7 if family == "yolo" else None)
    source = source_reference(folder, artifact.manifest, conf=conf, iou=params.iou)
    first = min(artifact.manifest.labels)  # YOLO ids start at 0, torchvision's at 1 (0 is background)
    theirs = evaluate_map(predict_fn(source, first), scenes)
    ours = evaluate_map(predict_fn(lambda im: artifact.detect([im], params)[0], first), scenes)
    print(f"{family}: source mAP50-95 {theirs['map50_95']:.4f} mAP50 {theirs['map50']:.4f}; "
          f"artifact {ours['map50_95']:.4f} / {ours['map50']:.4f}")  # fmt: skip
    assert theirs["map50"] > 0.1  # a trained model, so the comparison means something
    assert abs(ours["map50_95"] - theirs["map50_95"]) <= 0.005
    assert abs(ours["map50"] - theirs["map50"]) <= 0.005
