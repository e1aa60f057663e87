"""The device-resident path (runtime/device.py) against the CPU reference, run on the CPU.

The device path is torch end to end, so every stage runs here on the CPU: the
square letterbox against ``preprocess.letterbox(rect=False)``, the batched
device NMS against ``postprocess.yolo_nms``, bucket padding, and the CUDA-graph
bookkeeping (with a stand-in for the capture). What needs a GPU is marked
``gpu`` and skips with the reason.
"""

from __future__ import annotations


import numpy as np
import pytest
import torch

from detserve.export.parity import compare_all
from detserve.runtime.device import (
    CudaGraphs,
    DeviceBatch,
    DevicePath,
    GraphsUnavailable,
    bucket_for,
    buckets,
    device_boxes,
    letterbox_into,
)
from detserve.runtime.postprocess import DetectParams, unletterbox, yolo_nms
from detserve.runtime.preprocess import letterbox, pack
from tests.conftest import ROOT

IMGSZ = 320  # models/yolo-shapes.pt is trained at 320

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (none visible: torch.cuda.is_available() is False)")


@pytest.fixture(scope="module")
def yolo_model():
    from detserve.runtime.sources import load_yolo

    torch.set_num_threads(1)
    return load_yolo(ROOT / "models" / "yolo-shapes.pt").model.fuse().float().eval()


@pytest.fixture(scope="module")
def images(photos, scenes) -> list[np.ndarray]:
    return photos + [s.image for s in scenes[:6]]


def cpu_reference(model, images, params):
    """The CPU path with the square letterbox: numpy letterbox + pack, the model, yolo_nms, unletterbox, image by image."""
    out = []
    for image in images:
        boxed, geometry = letterbox(image, IMGSZ, rect=False)
        with torch.inference_mode():
            raw = model(torch.from_numpy(pack([boxed], 1 / 255)))[0].numpy()
        out.append(unletterbox(yolo_nms(raw, params)[0], geometry))
    return out


# -- buckets ----------------------------------------------------------------------


def test_buckets_are_powers_of_two_up_to_max():
    assert buckets(1) == (1,)
    assert buckets(8) == (1, 2, 4, 8)
    assert buckets(12) == (1, 2, 4, 8, 12)
    assert [bucket_for(n, buckets(32)) for n in (1, 2, 3, 5, 8, 9, 31, 32)] == [1, 2, 4, 8, 8, 16, 32, 32]
    with pytest.raises(ValueError, match="split it first"):
        bucket_for(33, buckets(32))
    with pytest.raises(ValueError):
        buckets(0)


# -- square letterbox ----------------------------------------------------------------


@pytest.mark.parametrize("shape", [(480, 640), (1080, 810), (37, 500), (320, 320), (100, 50), (200, 1000)])
def test_square_letterbox_in_torch_matches_preprocess_letterbox(shape):
    rng = np.random.default_rng(1)
    image = rng.integers(0, 256, shape + (3,), dtype=np.uint8)
    ours = torch.empty(3, IMGSZ, IMGSZ)
    geometry = letterbox_into(torch.from_numpy(image), ours, scale=1.0)
    theirs, their_geometry = letterbox(image, IMGSZ, rect=False)
    assert geometry == their_geometry
    diff = np.abs(ours.permute(1, 2, 0).numpy() - theirs.astype(np.float32))
    # cv2 resizes in 11-bit fixed point, torch in float: at most one grey level apart.
    # On random noise (the worst case) 6-9 % of resized pixels differ by that one level;
    # the pad and an unresized image are exact. Box parity is measured below.
    assert diff.max() <= 1.0
    assert (diff > 0).mean() < 0.15
    if shape == (320, 320):
        assert diff.max() == 0.0


def test_pack_fills_the_preallocated_buffer_and_pads_to_the_bucket():
    batch = DeviceBatch(imgsz=64, max_batch=8)
    address = batch.buffer.data_ptr()
    images = [torch.full((h, w, 3), 255, dtype=torch.uint8) for h, w in ((64, 64), (32, 64), (64, 16))]
    x, geometries = batch.pack(images)
    assert x.shape == (4, 3, 64, 64) and x.data_ptr() == address  # bucket 4 for 3 images, same memory
    assert [(g.orig_h, g.orig_w) for g in geometries] == [(64, 64), (32, 64), (64, 16)]
    pad = 114 / 255
    assert torch.all(x[0] == 1.0)
    assert torch.allclose(x[1, :, :16], torch.tensor(pad)) and torch.all(x[1, :, 16:48] == 1.0)
    assert torch.allclose(x[3], torch.tensor(pad))  # the padding row
    x2, _ = batch.pack(images[:1])
    assert x2.shape[0] == 1 and x2.data_ptr() == address


# -- NMS on the device -----------------------------------------------------------------


def test_device_nms_boxes_equal_yolo_nms():
    from tests.test_pre_post import random_raw

    raw = random_raw(5, nc=4, anchors=600, seed=3)
    geometries = [letterbox(np.zeros((h, w, 3), np.uint8), IMGSZ)[1] for h, w in ((480, 640), (320, 320), (1080, 810), (37, 500), (640, 480))]
    for params in (DetectParams(conf=0.05), DetectParams(conf=0.2, iou=0.6, max_det=7), DetectParams(conf=0.05, classes=(1, 3)), DetectParams(conf=0.05, agnostic=True)):
        reference = [unletterbox(d, g) for d, g in zip(yolo_nms(raw, params), geometries)]
        ours = device_boxes(torch.from_numpy(raw), geometries, params)
        assert sum(len(d) for d in reference) > 0
        for a, b in zip(ours, reference):
            np.testing.assert_array_equal(a.class_ids, b.class_ids)
            np.testing.assert_allclose(a.scores, b.scores, rtol=0, atol=0)
            np.testing.assert_allclose(a.boxes, b.boxes, rtol=0, atol=1e-4)


def test_device_nms_with_a_setting_per_image():
    from tests.test_pre_post import random_raw

    raw = random_raw(3, seed=5)
    geometries = [letterbox(np.zeros((320, 320, 3), np.uint8), IMGSZ)[1]] * 3
    settings = [DetectParams(conf=0.05), DetectParams(conf=0.5), DetectParams(conf=0.05)]
    ours = device_boxes(torch.from_numpy(raw), geometries, settings)
    for i, setting in enumerate(settings):
        alone = unletterbox(yolo_nms(raw[i : i + 1], setting)[0], geometries[i])
        np.testing.assert_allclose(ours[i].boxes, alone.boxes, atol=1e-4)
        np.testing.assert_array_equal(ours[i].class_ids, alone.class_ids)
    assert len(ours[1]) < len(ours[0])


# -- the whole path on the trained model -------------------------------------------------


def test_device_path_boxes_match_the_cpu_reference(yolo_model, images):
    params = DetectParams(conf=0.25)
    path = DevicePath(yolo_model, imgsz=IMGSZ, max_batch=4)
    ours = path.detect([torch.from_numpy(im.copy()) for im in images], params)
    reference = cpu_reference(yolo_model, images, params)
    result = compare_all(reference, ours, iou=0.99)
    assert result.source_boxes >= 10  # a trained model: real boxes to compare
    assert result.matched == result.source_boxes and result.artifact_boxes == result.source_boxes
    assert result.max_box_diff_px < 0.5 and result.max_score_diff < 0.01


def test_bucket_padding_gives_each_image_the_boxes_it_gets_alone(yolo_model, images):
    params = DetectParams(conf=0.25)
    path = DevicePath(yolo_model, imgsz=IMGSZ, max_batch=8)
    chosen = [torch.from_numpy(im.copy()) for im in images[:5]]  # 5 images run as a bucket of 8
    together = path.detect(chosen, params)
    alone = [path.detect([im], params)[0] for im in chosen]
    assert sum(len(d) for d in alone) > 0
    for a, b in zip(together, alone):
        np.testing.assert_array_equal(a.class_ids, b.class_ids)
        np.testing.assert_allclose(a.boxes, b.boxes, atol=1e-3)
        np.testing.assert_allclose(a.scores, b.scores, atol=1e-5)


# -- CUDA graphs -----------------------------------------------------------------------


def test_cuda_graphs_refuse_without_cuda_and_say_why():
    with pytest.raises(GraphsUnavailable, match="CUDA"):
        CudaGraphs(lambda x: x, DeviceBatch(imgsz=32, max_batch=4, device="cpu"))


def test_cuda_graph_bookkeeping_one_capture_per_bucket():
    """With a stand-in capture: one graph per bucket, captured on a view of the one buffer, reused after."""
    batch = DeviceBatch(imgsz=32, max_batch=8)
    captured = []

    def fake_capture(model, static_input):
        captured.append((static_input.shape[0], static_input.data_ptr()))
        static_output = torch.zeros(static_input.shape[0], 5)

        def replay():  # what a replay does: the model on whatever the buffer holds now, into the static output
            static_output.copy_(model(static_input))

        return replay, static_output

    graphs = CudaGraphs(lambda x: x.mean(dim=(2, 3)).repeat(1, 2)[:, :5], batch, capture=fake_capture)
    sizes = []
    for n in (1, 3, 4, 2, 3, 8, 5):
        x, _ = batch.pack([torch.full((32, 32, 3), 10 * n, dtype=torch.uint8)] * n)
        out = graphs(x)
        sizes.append(out.shape[0])
        assert torch.allclose(out[:n, 0], torch.tensor(10.0 * n / 255))  # the replay saw this batch's pixels
    assert sizes == [1, 4, 4, 2, 4, 8, 8]
    assert [c[0] for c in captured] == [1, 4, 2, 8] and graphs.captures == 4 and graphs.replays == 7
    assert {c[1] for c in captured} == {batch.buffer.data_ptr()}
    graphs.capture_all()
    assert graphs.captures == 4 and set(graphs.graphs) == set(batch.sizes)
    with pytest.raises(ValueError, match="buffer"):
        graphs(torch.zeros(2, 3, 32, 32))  # not the buffer: a graph would read stale memory


@pytest.mark.gpu
@cuda
def test_device_path_on_cuda_with_graphs_matches_the_cpu_reference(yolo_model, images):
    params = DetectParams(conf=0.25)
    model = yolo_model.to("cuda")
    ours = DevicePath(model, imgsz=IMGSZ, max_batch=4, device="cuda", cuda_graphs=True).detect([torch.from_numpy(im.copy()) for im in images], params)
    reference = cpu_reference(yolo_model.to("cpu"), images, params)
    result = compare_all(reference, ours, iou=0.99)
    assert result.matched == result.source_boxes > 0
