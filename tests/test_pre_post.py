"""Pre- and post-processing equal Ultralytics' own arithmetic (so boxes match YOLO.predict)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from detserve.runtime.postprocess import DetectParams, Detections, filter_detections, unletterbox, yolo_nms
from detserve.runtime.preprocess import letterbox, pack


@pytest.mark.parametrize("shape", [(480, 640), (640, 480), (1080, 810), (37, 500), (500, 37), (320, 320), (100, 50)])
@pytest.mark.parametrize("size", [320, 640])
@pytest.mark.parametrize("rect", [False, True])
def test_letterbox_matches_ultralytics_pixel_for_pixel(shape, size, rect):
    from ultralytics.data.augment import LetterBox

    rng = np.random.default_rng(0)
    image = rng.integers(0, 255, shape + (3,), dtype=np.uint8)
    ours, geometry = letterbox(image, size, rect=rect)
    theirs = LetterBox((size, size), auto=rect, stride=32)(image=image)  # YOLO.predict: auto = rect = True
    assert ours.shape == theirs.shape
    assert max(ours.shape[:2]) == size and all(side % 32 == 0 for side in ours.shape[:2])
    np.testing.assert_array_equal(ours, theirs)
    assert (geometry.orig_h, geometry.orig_w) == shape


@pytest.mark.parametrize("shape", [(480, 640), (1080, 810), (37, 500)])
def test_unletterbox_matches_ultralytics_scale_boxes(shape):
    from ultralytics.utils.ops import scale_boxes

    padded, geometry = letterbox(np.zeros(shape + (3,), np.uint8), 320, rect=True)
    boxes = np.array([[10, 20, 200, 300], [0, 0, 320, 320], [150.5, 60.25, 170.75, 90.5]], np.float32)
    ours = unletterbox(Detections(boxes.copy(), np.ones(3, np.float32), np.zeros(3, np.int64)), geometry).boxes
    theirs = scale_boxes(padded.shape[:2], torch.from_numpy(boxes.copy()), shape).numpy()
    np.testing.assert_allclose(ours, theirs, atol=1e-4)


def test_pack_is_nchw_scaled():
    images = [np.full((4, 6, 3), v, np.uint8) for v in (0, 255)]
    images[0][1, 2] = (10, 20, 30)
    x = pack(images, 1 / 255)
    assert x.shape == (2, 3, 4, 6) and x.dtype == np.float32
    np.testing.assert_allclose(x[0, :, 1, 2], np.array([10, 20, 30]) / 255, rtol=1e-6)
    assert x[1].min() == 1.0


def random_raw(n: int, nc: int = 4, anchors: int = 400, seed: int = 0) -> np.ndarray:
    """Plausible YOLO head output: clustered boxes (so NMS has work), sparse confident classes."""
    rng = np.random.default_rng(seed)
    centres = rng.uniform(40, 280, (n, 12, 2))
    pick = rng.integers(0, 12, (n, anchors))
    xy = np.take_along_axis(centres, pick[..., None], axis=1) + rng.normal(0, 6, (n, anchors, 2))
    wh = rng.uniform(20, 80, (n, anchors, 2))
    scores = rng.uniform(0, 1, (n, anchors, nc)) ** 6
    raw = np.concatenate([xy, wh, scores], axis=-1).astype(np.float32)
    return raw.transpose(0, 2, 1).copy()  # [N, 4 + nc, A]


@pytest.mark.parametrize(
    "params",
    [
        DetectParams(conf=0.25, iou=0.45),
        DetectParams(conf=0.05, iou=0.7, max_det=7),
        DetectParams(conf=0.1, iou=0.5, agnostic=True),
        DetectParams(conf=0.1, iou=0.5, classes=(1, 3)),
        DetectParams(conf=0.001, iou=0.6, max_det=300),
    ],
)
@pytest.mark.parametrize("n", [1, 4])
def test_batched_nms_equals_ultralytics_per_image(params, n):
    from ultralytics.utils.nms import non_max_suppression

    raw = random_raw(n, seed=n)
    ours = yolo_nms(raw, params)
    theirs = non_max_suppression(
        torch.from_numpy(raw), params.conf, params.iou, classes=list(params.classes) if params.classes else None,
        agnostic=params.agnostic, max_det=params.max_det,
    )  # fmt: skip
    assert len(ours) == n
    total = 0
    for det, ref in zip(ours, theirs):
        ref = ref.numpy()
        assert len(det) == len(ref)
        order = np.lexsort((det.boxes[:, 0], -det.scores))
        ref_order = np.lexsort((ref[:, 0], -ref[:, 4]))
        np.testing.assert_allclose(det.boxes[order], ref[ref_order, :4], atol=1e-4)
        np.testing.assert_allclose(det.scores[order], ref[ref_order, 4], atol=1e-6)
        np.testing.assert_array_equal(det.class_ids[order], ref[ref_order, 5].astype(np.int64))
        total += len(det)
    assert total > 0  # the case exercised something


def test_nms_keeps_images_apart():
    # The same box in two images must survive in both (one NMS call for the batch).
    raw = np.zeros((2, 5, 1), np.float32)
    raw[:, :4, 0] = (100, 100, 50, 50)
    raw[:, 4, 0] = 0.9
    out = yolo_nms(raw, DetectParams(conf=0.5))
    assert [len(d) for d in out] == [1, 1]


def test_filter_detections_applies_conf_classes_and_max_det():
    det = Detections(np.arange(20, dtype=np.float32).reshape(5, 4), np.array([0.9, 0.8, 0.6, 0.4, 0.2], np.float32), np.array([1, 2, 1, 2, 1]))
    out = filter_detections(det, DetectParams(conf=0.3, classes=(1,), max_det=1))
    assert out.scores.tolist() == [pytest.approx(0.9)] and out.class_ids.tolist() == [1]


@pytest.mark.parametrize("bad", [dict(conf=1.5), dict(iou=-0.1), dict(max_det=0)])
def test_detect_params_refuse_bad_values(bad):
    with pytest.raises(ValueError):
        DetectParams(**bad)


@pytest.mark.parametrize("family", ["yolo", "fasterrcnn"])
def test_the_server_prepares_each_image_once_and_packs_once_per_engine_call(family, request, monkeypatch):
    """Issue 9: an image is prepared once as it arrives; a batch is packed once, when it is formed
    (never packed per request, split into rows and packed again)."""
    from detserve.runtime import detector as detector_module, preprocess
    from detserve.runtime.detector import Detector, engine_calls
    from detserve.runtime.images import Limits
    from detserve.serve.batching import prepare, run_batch

    detector = Detector(request.getfixturevalue(f"{family}_export"), backend="onnxruntime", device="cpu")
    prepared_calls, packed = [], []
    real_prepare, real_pack = preprocess.prepare, detector_module.pack_inputs
    monkeypatch.setattr(detector_module, "prepare", lambda *a, **k: prepared_calls.append(1) or real_prepare(*a, **k))
    monkeypatch.setattr(detector_module, "pack_inputs", lambda images, spec: packed.append(len(images)) or real_pack(images, spec))

    rng = np.random.default_rng(3)
    shapes = [(96, 128), (96, 128), (128, 96), (96, 128), (64, 64)]  # Faster R-CNN: three pad sizes
    items = [prepare(detector, rng.integers(0, 255, s + (3,), dtype=np.uint8), Limits()) for s in shapes]
    assert len(prepared_calls) == len(items)
    results = run_batch(detector, items, [detector.params()] * len(items))
    assert len(prepared_calls) == len(items)  # nothing prepared again when the batch runs
    calls = engine_calls([i.prepared for i in items], detector.engine.max_batch)
    assert sorted(packed) == sorted(len(c) for c in calls) and sum(packed) == len(items)
    assert len(packed) == len({i.prepared.key for i in items}) > 1  # one pack per shape; same-shape images of any request share it
    assert all(isinstance(r, Detections) for r in results)
