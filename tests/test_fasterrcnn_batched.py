"""Batched Faster R-CNN (detserve/batched_rcnn.py, export/fasterrcnn.py): one graph, dynamic N/H/W, torchvision's results.

Parity is judged on the trained shapes model (models/fasterrcnn-shapes.pth)
against torchvision's own eval forward, both for the PyTorch wrapper and for
the exported ONNX graph run by onnxruntime:

* images of one aspect ratio but different original sizes pad to the same
  size alone and in a batch, so every image must match ``model([image])``
  (IoU >= 0.99, same label, score within 1e-4), for N in BATCH_SIZES (1 to 8);
* images of mixed sizes share the batch's padding, which changes the
  backbone's features near the padded border: they must match torchvision's
  batched forward ``model(images)`` (the same computation), for the same N.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

import detserve.runtime.offline

detserve.runtime.offline.apply()

from detserve.runtime.postprocess import Detections  # noqa: E402
from detserve.runtime.batched_rcnn import INPUT_NAMES, OUTPUT_NAMES, BatchedFasterRCNN, resize_and_batch  # noqa: E402
from detserve.export.fasterrcnn import export_batched  # noqa: E402
from detserve.export.parity import ParityResult, compare  # noqa: E402
from tests.conftest import ROOT  # noqa: E402

WEIGHTS = ROOT / "models" / "fasterrcnn-shapes.pth"
SCORE_TOL = 1e-4
#: detections this close to box_score_thresh may appear on one side only (fp32 noise)
EDGE = 1e-3


# --------------------------------------------------------------------------- helpers


def _to_tensor(image: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(image.transpose(2, 0, 1))).float() / 255.0


@torch.inference_mode()
def _torchvision(model, images: list[np.ndarray], batched: bool) -> list[Detections]:
    """torchvision's eval forward: image by image, or all images in one call."""
    if batched:
        results = model([_to_tensor(im) for im in images])
    else:
        results = [model([_to_tensor(im)])[0] for im in images]
    return [Detections(r["boxes"].numpy(), r["scores"].numpy(), r["labels"].numpy().astype(np.int64)) for r in results]


def _unpad(boxes, scores, labels, num) -> list[Detections]:
    boxes, scores, labels, num = (np.asarray(t) for t in (boxes, scores, labels, num))
    out = []
    for i in range(len(num)):
        n = int(num[i])
        assert (labels[i, n:] == -1).all() and (scores[i, n:] == 0).all() and (boxes[i, n:] == 0).all()
        assert (labels[i, :n] >= 1).all()
        assert (np.diff(scores[i, :n]) <= 0).all(), "detections are sorted by score"
        out.append(Detections(boxes[i, :n], scores[i, :n], labels[i, :n]))
    return out


def _strip_edge(d: Detections, thresh: float) -> Detections:
    keep = d.scores >= thresh + EDGE
    return Detections(d.boxes[keep], d.scores[keep], d.class_ids[keep])


def _parity(refs: list[Detections], outs: list[Detections], thresh: float) -> ParityResult:
    """Every detection not within EDGE of the score threshold matched, both ways."""
    total = ParityResult()
    for ref, out in zip(refs, outs, strict=True):
        ref, out = _strip_edge(ref, thresh), _strip_edge(out, thresh)
        total.add(compare(ref, out, iou=0.99))
    return total


def _assert_parity(p: ParityResult, what: str) -> None:
    assert p.matched == p.source_boxes == p.artifact_boxes, f"{what}: {p}"
    assert p.max_score_diff <= SCORE_TOL, f"{what}: {p}"


# --------------------------------------------------------------------------- fixtures (trained model)


@pytest.fixture(scope="module")
def trained():
    if not WEIGHTS.is_file():
        pytest.skip(f"{WEIGHTS} is not there yet (made by the training step)")
    from detserve.runtime.sources import build_fasterrcnn, read_fasterrcnn_checkpoint

    ckpt = read_fasterrcnn_checkpoint(WEIGHTS, None)
    return build_fasterrcnn(ckpt.arch, ckpt.num_classes, state_dict=ckpt.state_dict, min_size=ckpt.min_size, max_size=ckpt.max_size)


@pytest.fixture(scope="module")
def wrapped(trained):
    return BatchedFasterRCNN(trained)


@pytest.fixture(scope="module")
def onnx_path(wrapped, tmp_path_factory) -> Path:
    return export_batched(wrapped, tmp_path_factory.mktemp("batched") / "fasterrcnn_batched.onnx")


@pytest.fixture(scope="module")
def session(onnx_path):
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 2
    return ort.InferenceSession(str(onnx_path), opts, providers=["CPUExecutionProvider"])


@pytest.fixture(scope="module")
def mixed_images() -> list[np.ndarray]:
    """Generated scenes of random sizes (each side 200-480 px)."""
    from detserve.training.synthetic import scenes

    return [s.image for s in scenes(8, seed=4321)]


@pytest.fixture(scope="module")
def same_ratio_images() -> list[np.ndarray]:
    """Scenes of one aspect ratio (3:4) and different original sizes: one padded size, alone or batched."""
    from detserve.training.synthetic import make_scene

    sizes = [(240, 320), (300, 400), (360, 480), (270, 360), (330, 440), (240, 320), (300, 400), (360, 480)]
    return [make_scene(np.random.default_rng([77, i]), width=w, height=h).image for i, (h, w) in enumerate(sizes)]


def _run_torch(wrapped, images):
    batch, sizes, originals = wrapped.prepare(images)
    with torch.inference_mode():
        out = wrapped(torch.from_numpy(batch), torch.from_numpy(sizes), torch.from_numpy(originals))
    return _unpad(*out)


def _run_onnx(session, wrapped, images):
    batch, sizes, originals = wrapped.prepare(images)
    out = session.run(OUTPUT_NAMES, dict(zip(INPUT_NAMES, (batch, sizes, originals))))
    boxes, scores, labels, num = out
    assert boxes.shape == (len(images), wrapped.detections_per_img, 4) and labels.dtype == np.int64 and num.dtype == np.int64
    return _unpad(*out)


# --------------------------------------------------------------------------- preprocessing


def test_resize_and_batch_is_torchvisions_transform(trained, mixed_images):
    t = trained.transform
    batch, sizes, originals = resize_and_batch(mixed_images, t.min_size[-1], t.max_size, t.size_divisible)
    with torch.inference_mode():
        image_list, _ = trained.transform([_to_tensor(im) for im in mixed_images])
    assert batch.shape == tuple(image_list.tensors.shape) and batch.shape[2] % 32 == 0 and batch.shape[3] % 32 == 0
    assert np.array_equal(batch, image_list.tensors.numpy())  # bit for bit: normalise, resize, zero pad
    assert [tuple(s) for s in sizes.tolist()] == [tuple(s) for s in image_list.image_sizes]
    assert originals.tolist() == [list(im.shape[:2]) for im in mixed_images]


# --------------------------------------------------------------------------- parity, trained model

#: Batch sizes checked against torchvision: one image, the smallest batch, an odd size, and the largest
#: batch Faster R-CNN gets on a GPU pod (8). Every size from 1 to 8 cost twice the time of these four.
BATCH_SIZES = (1, 2, 5, 8)


@pytest.fixture(scope="module")
def same_refs(trained, same_ratio_images) -> list[Detections]:
    """torchvision, image by image."""
    return _torchvision(trained, same_ratio_images, batched=False)


@pytest.fixture(scope="module")
def mixed_refs(trained, mixed_images) -> dict[int, list[Detections]]:
    """torchvision's batched forward on the first n images, for each n."""
    return {n: _torchvision(trained, mixed_images[:n], batched=True) for n in BATCH_SIZES}


def _runner(backend, wrapped, request):
    if backend == "torch":
        return lambda images: _run_torch(wrapped, images)
    session = request.getfixturevalue("session")
    return lambda images: _run_onnx(session, wrapped, images)


@pytest.mark.parametrize("backend", ["torch", "onnxruntime"])
def test_same_size_batches_match_torchvision_image_by_image(backend, wrapped, same_ratio_images, same_refs, request):
    run = _runner(backend, wrapped, request)
    total = ParityResult()
    for n in BATCH_SIZES:
        p = _parity(same_refs[:n], run(same_ratio_images[:n]), wrapped.box_score_thresh)
        _assert_parity(p, f"{backend} N={n}")
        total.add(p)
    assert total.source_boxes >= 100  # parity judged on real boxes


@pytest.mark.parametrize("backend", ["torch", "onnxruntime"])
def test_mixed_size_batches_match_torchvision_batched(backend, wrapped, mixed_images, mixed_refs, request):
    """Mixed sizes: the batch's common padding is part of the computation, as in ``model(images)``.

    (Image by image, torchvision pads each image only to its own multiple of 32;
    features near the border differ, and with the undertrained shapes model so
    do many boxes. Batches whose images resize to one size match image by image:
    see the test above.)
    """
    run = _runner(backend, wrapped, request)
    total = ParityResult()
    for n in BATCH_SIZES:
        p = _parity(mixed_refs[n], run(mixed_images[:n]), wrapped.box_score_thresh)
        _assert_parity(p, f"{backend} N={n}")
        total.add(p)
    assert total.source_boxes >= 100


def test_onnx_graph_is_one_batched_graph(session, onnx_path):
    import onnx

    inputs = {i.name: i for i in session.get_inputs()}
    assert list(inputs) == INPUT_NAMES and [o.name for o in session.get_outputs()] == OUTPUT_NAMES
    shape = inputs["images"].shape
    assert all(isinstance(shape[i], str) for i in (0, 2, 3)) and shape[1] == 3  # N, H, W dynamic
    assert session.get_outputs()[0].shape[1:] == [100, 4]
    ops = {node.op_type for node in onnx.load(str(onnx_path)).graph.node}
    assert not ops & {"Loop", "If", "Scan", "SequenceConstruct"}  # no unrolled batch, no control flow
    assert "NonMaxSuppression" in ops and "TopK" in ops


# --------------------------------------------------------------------------- other archs: mechanics


def _lively_random_init(model: torch.nn.Module, seed: int = 5) -> torch.nn.Module:
    """Re-initialise a random model so that activations and scores are not degenerate.

    torchvision's random init gives near-zero features and logits, so every
    score ties (sigmoid/softmax of ~0) and order-dependent steps cannot be
    compared. He-init the convolutions and scale the heads for O(1) logits.
    """
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for mod in list(model.backbone.modules()) + list(model.rpn.head.conv.modules()):
            if isinstance(mod, torch.nn.Conv2d):
                mod.weight.normal_(0, (2.0 / mod.weight[0].numel()) ** 0.5, generator=g)
        feats = model.backbone(torch.randn(1, 3, 256, 256, generator=g))
        t_std = model.rpn.head.conv(feats["0"]).std().item()
        c = model.rpn.head.cls_logits.in_channels**0.5
        model.rpn.head.cls_logits.weight.normal_(0, 1.5 / (t_std * c), generator=g)
        model.rpn.head.bbox_pred.weight.normal_(0, 0.3 / (t_std * c), generator=g)
        pooled = model.roi_heads.box_roi_pool(feats, [torch.tensor([[10.0, 10, 100, 120], [50, 60, 200, 250], [0, 0, 256, 256]])], [(256, 256)])
        model.roi_heads.box_roi_pool.scales = None  # let the real forward infer them again
        h = model.roi_heads.box_head(pooled)
        d = h.shape[1] ** 0.5
        model.roi_heads.box_predictor.cls_score.weight.normal_(0, 1.5 / (h.std().item() * d), generator=g)
        model.roi_heads.box_predictor.bbox_pred.weight.normal_(0, 0.3 / (h.std().item() * d), generator=g)
    return model.eval()


@pytest.mark.slow
@pytest.mark.parametrize("arch", ["fasterrcnn_resnet50_fpn", "fasterrcnn_resnet50_fpn_v2"])
def test_resnet50_fpn_exports_and_matches(arch, tmp_path):
    """ResNet-50 FPN archs (5 FPN levels, multi-level RoIAlign; v2: conv box head) at a small size."""
    import onnxruntime as ort

    from detserve.runtime.sources import build_fasterrcnn

    torch.manual_seed(0)
    model = _lively_random_init(build_fasterrcnn(arch, 5, min_size=200, max_size=300))
    wrapped = BatchedFasterRCNN(model)
    path = export_batched(wrapped, tmp_path / "r50.onnx")
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    rng = np.random.default_rng(3)
    for sizes in ([(230, 310)], [(200, 260), (300, 220), (250, 250)]):
        images = [rng.integers(0, 256, (h, w, 3), dtype=np.uint8) for h, w in sizes]
        refs = _torchvision(model, images, batched=True)
        torch_out = _run_torch(wrapped, images)
        onnx_out = _run_onnx(session, wrapped, images)
        _assert_parity(_parity(refs, torch_out, wrapped.box_score_thresh), f"torch {sizes}")
        _assert_parity(_parity(refs, onnx_out, wrapped.box_score_thresh), f"onnx {sizes}")


@pytest.mark.slow
def test_mobilenet_large_fpn_exports_and_matches(tmp_path):
    """fasterrcnn_mobilenet_v3_large_fpn (random init) at N = 1 and 3."""
    import onnxruntime as ort

    from detserve.runtime.sources import build_fasterrcnn

    torch.manual_seed(0)
    model = _lively_random_init(build_fasterrcnn("fasterrcnn_mobilenet_v3_large_fpn", 3, min_size=256, max_size=320))
    wrapped = BatchedFasterRCNN(model)
    session = ort.InferenceSession(str(export_batched(wrapped, tmp_path / "mb.onnx")), providers=["CPUExecutionProvider"])
    rng = np.random.default_rng(4)
    for sizes in ([(200, 300)], [(260, 200), (300, 300), (210, 280)]):
        images = [rng.integers(0, 256, (h, w, 3), dtype=np.uint8) for h, w in sizes]
        refs = _torchvision(model, images, batched=True)
        _assert_parity(_parity(refs, _run_torch(wrapped, images), wrapped.box_score_thresh), f"torch {sizes}")
        _assert_parity(_parity(refs, _run_onnx(session, wrapped, images), wrapped.box_score_thresh), f"onnx {sizes}")
