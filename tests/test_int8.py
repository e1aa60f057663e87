"""int8 variants (docs/precision.md): the export, the kernels onnxruntime runs, the gate, TensorRT's rules, and the choice.

The module's exports are small: the default models' weights, a few dozen
generated scenes to calibrate, agree and score on (``_small_int8``); the
full default sets run behind ``@pytest.mark.slow``.
"""

from __future__ import annotations

import json
import shutil
from contextlib import nullcontext
from pathlib import Path

import numpy as np
import pytest

import detserve.export.quantize as quantize
import detserve.export.tensorrt as trt_export
import detserve.runtime.engines.tensorrt as trt_lookup
from detserve.export.pipeline import ExportError, ExportRequest, export_model
from detserve.export.tensorrt import explicit_quantization_violations
from detserve.runtime.detector import Detector
from detserve.runtime.manifest import MANIFEST_NAME, Manifest, ManifestError, read_manifest, sha256_file, variant_manifest
from detserve.runtime.variants import choose, fastest
from detserve.training.datasets import read_labelled, scene_set
from detserve.training.synthetic import CLASSES, scenes, yolo_labels

ROOT = Path(__file__).resolve().parent.parent
WEIGHTS = {"yolo": ROOT / "models" / "yolo-shapes.pt", "fasterrcnn": ROOT / "models" / "fasterrcnn-shapes.pth"}


def _small_int8(family: str, out: Path, **kw) -> ExportRequest:
    """An int8 export request on small image sets: 8 scenes calibrate, 8 others agree, 24 labelled others score.

    24 images cannot tell half a point of mAP from noise (their mAP moves by a point between calibrations), so
    these exports allow 5 points: they test the mechanics; the slow test holds the default models to half a point.
    """
    sets = dict(
        calibration_images=[s.image for s in scenes(8, 501)],
        agreement_images=[s.image for s in scenes(8, 502)],
        val_images=scene_set(24, 503),
        val_source="24 generated scenes (seed 503)",
        max_map_drop=0.05,
    )
    return ExportRequest(model=family, weights=WEIGHTS[family], out=out, precision="int8", quiet=True, **{**sets, **kw})


@pytest.fixture(scope="module")
def yolo_int8(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("int8") / "yolo"
    export_model(_small_int8("yolo", out))
    return out


@pytest.fixture(scope="module")
def fasterrcnn_int8(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("int8") / "fasterrcnn"
    export_model(_small_int8("fasterrcnn", out))
    return out


# -- the export -----------------------------------------------------------------------


@pytest.mark.parametrize("family", ["yolo", pytest.param("fasterrcnn", marks=pytest.mark.slow)])  # Faster R-CNN int8: 20 s more
def test_int8_export_writes_both_encodings_beside_the_exact_one(family, request):
    out = request.getfixturevalue(f"{family}_int8")
    m = read_manifest(out)
    assert (m.artifact, m.precision, m.parity.passed) == ("model.onnx", "fp32", True)
    by_name = {v.name: v for v in m.variants}
    assert set(by_name) == {"int8-cpu", "int8-trt"}
    assert (by_name["int8-cpu"].target, by_name["int8-trt"].target) == ("cpu", "gpu")
    for v in m.variants:
        assert v.precision == "int8" and v.format == "onnx" and sha256_file(out / v.artifact) == v.artifact_sha256
        assert v.float_nodes, "what stayed in float is recorded, with why"
        gate = v.gate
        assert gate.basis == "val" and gate.val.images == 24 and gate.val.objects > 0
        assert gate.calibration_images == 8 and gate.agreement.images == 8 and gate.agreement.reference_boxes > 0
        assert 0 < gate.val.reference_map50_95 <= 1 and 0 < gate.val.map50_95 <= 1
        assert gate.val.drop == pytest.approx(gate.val.reference_map50_95 - gate.val.map50_95, abs=1e-5)
        assert gate.passed == (gate.val.drop <= gate.max_map_drop == 0.05)
    assert by_name["int8-cpu"].gate.passed, "the export would have failed otherwise"
    # One calibration for both encodings, kept beside them.
    ranges = json.loads((out / quantize.CALIBRATION_NAME).read_text())
    assert ranges


@pytest.mark.parametrize("family", ["yolo", pytest.param("fasterrcnn", marks=pytest.mark.slow)])  # Faster R-CNN int8: 20 s more
def test_cpu_encoding_runs_on_int8_kernels(family, request):
    out = request.getfixturevalue(f"{family}_int8")
    m = read_manifest(out)
    cpu = next(v for v in m.variants if v.name == "int8-cpu")
    k = cpu.kernels
    assert k.int8_share >= 0.9 and k.ops.get("QLinearConv", 0) > 20
    assert k.int8_compute == sum(k.ops.get(op, 0) for op in quantize.INT8_COMPUTE_OPS)
    # The count tells the cases apart: the fp32 graph runs no int8 kernel at all.
    fp32 = quantize.count_kernels(out / m.artifact)
    assert fp32.int8_compute == 0 and fp32.float_compute > 20 and fp32.int8_share == 0


def test_yolo_keeps_the_dfl_decode_and_concat_in_float(yolo_int8):
    import onnx

    graph = onnx.load(str(yolo_int8 / "model.int8-cpu.onnx")).graph
    consumed_by_q = {n.input[0] for n in graph.node if n.op_type == "QuantizeLinear"}
    head = max(int(n.name.split("/")[1].split(".")[1]) for n in graph.node if n.name.startswith("/model."))
    tail = [n for n in graph.node if n.name.startswith(f"/model.{head}/") and "/cv2." not in n.name and "/cv3." not in n.name]
    assert any("/dfl/" in n.name for n in tail)
    for node in tail:  # no output of the DFL, the decode or the concat is quantized
        assert not set(node.output) & consumed_by_q, node.name
    # ... while the head's box and class convolutions are.
    convs = [n for n in graph.node if n.op_type == "Conv" and "/cv2." in n.name]
    assert convs and all(any(i.endswith("_DequantizeLinear_Output") for i in n.input) for n in convs)


# -- TensorRT's rules ------------------------------------------------------------------


@pytest.mark.parametrize("family", ["yolo", pytest.param("fasterrcnn", marks=pytest.mark.slow)])  # Faster R-CNN int8: 20 s more
def test_tensorrt_encoding_obeys_explicit_quantization_rules(family, request):
    import onnx

    out = request.getfixturevalue(f"{family}_int8")
    path = out / "model.int8-trt.onnx"
    assert explicit_quantization_violations(path) == []
    graph = onnx.load(str(path)).graph
    qdq = [n for n in graph.node if n.op_type in ("QuantizeLinear", "DequantizeLinear")]
    assert len(qdq) > 40, "the encoding is quantized at all"
    inits = {i.name: i for i in graph.initializer}
    for node in qdq:  # the rule, checked here directly too: int8, zero point 0
        zero = onnx.numpy_helper.to_array(inits[node.input[2]])
        assert zero.dtype == np.int8 and not zero.any()


def test_the_rule_check_refuses_what_tensorrt_refuses(yolo_int8):
    import onnx
    from onnx import helper

    # The CPU encoding: uint8, asymmetric zero points, int32 biases.
    found = explicit_quantization_violations(yolo_int8 / "model.int8-cpu.onnx")
    assert any("uint8" in f for f in found) and any("int32" in f for f in found)
    model = onnx.load(str(yolo_int8 / "model.int8-trt.onnx"))
    model.graph.node.append(helper.make_node("QLinearConv", ["a", "b", "c", "d", "e", "f", "g", "h"], ["y"], name="fused", domain="com.microsoft"))
    model.graph.node.append(helper.make_node("DFT", ["a"], ["z"], name="spectrum"))
    found = explicit_quantization_violations(model)
    assert any("fused" in f and "domain" in f for f in found) and any("no DFT" in f for f in found)
    for opset in model.opset_import:
        if opset.domain == "":
            opset.version = 22
    assert any("opset 22" in f for f in explicit_quantization_violations(model))


# -- the gate failing when it should ------------------------------------------------------


@pytest.mark.slow  # the other gate failure (a broken calibration) runs in make test
def test_a_negative_max_map_drop_fails_the_export_and_keeps_the_figures(tmp_path):
    out = tmp_path / "yolo"
    with pytest.raises(ExportError, match="int8 accuracy gate failed for int8-cpu.*beyond --max-map-drop -1"):
        export_model(_small_int8("yolo", out, max_map_drop=-1.0))
    m = read_manifest(out)
    assert {v.name: v.gate.passed for v in m.variants} == {"int8-cpu": False, "int8-trt": False}
    # The exact export still serves; int8 is refused with the reason; auto runs the exact one without timing anything.
    assert Detector(out, backend="onnxruntime", device="cpu").describe()["variant"] == "fp32"
    with pytest.raises(ManifestError, match="did not pass its accuracy gate"):
        Detector(out, backend="onnxruntime", device="cpu", precision="int8")

    def never(*_):
        raise AssertionError("nothing to time: no variant passed")

    auto = Detector(out, backend="onnxruntime", device="cpu", precision="auto", measure=never)
    assert (auto.choice.variant, auto.manifest.artifact) == ("fp32", "model.onnx")


@pytest.mark.slow  # 11 s: a whole int8 export and its gate (make test-slow); gate.decide's rules are tested below without one
def test_a_broken_calibration_fails_the_gate(tmp_path):
    # Flat grey frames: every activation range is far narrower than real images need, so int8 clips them.
    grey = [np.full((320, 320, 3), 114, np.uint8) for _ in range(4)]
    with pytest.raises(ExportError, match="int8 accuracy gate failed"):
        export_model(_small_int8("yolo", tmp_path / "yolo", calibration_images=grey))
    gate = next(v.gate for v in read_manifest(tmp_path / "yolo").variants if v.name == "int8-cpu")
    assert gate.val.drop > 0.05 and not gate.passed


def test_without_labels_agreement_decides_and_needs_enough_boxes(tmp_path):
    from detserve.export import gate as gatelib
    from detserve.runtime.manifest import Agreement

    def agreed(boxes: int, share: float) -> Agreement:
        return Agreement(images=8, source="s", conf=0.25, reference_boxes=boxes, found_share=share, map50_95=0.9, map50=0.99)

    assert gatelib.decide(agreed(60, 0.95), None, calibration="c", calibration_images=8).passed
    low = gatelib.decide(agreed(60, 0.80), None, calibration="c", calibration_images=8)
    assert not low.passed and low.basis == "agreement" and "below 90%" in low.reason
    few = gatelib.decide(agreed(5, 1.0), None, calibration="c", calibration_images=8)
    assert not few.passed and "too few" in few.reason and "--val" in few.reason


@pytest.mark.slow  # 4 s: an fp32 export before the check (make test-slow)
def test_calibration_and_gate_images_must_differ(tmp_path):
    same = [s.image for s in scenes(4, 77)]
    with pytest.raises(ExportError, match="4 of the agreement images also calibrate"):
        export_model(_small_int8("yolo", tmp_path / "y", calibration_images=same, agreement_images=same))


def test_calibration_and_val_flags_need_int8(tmp_path):
    with pytest.raises(ExportError, match="for --precision int8"):
        export_model(ExportRequest(model="yolo", weights=WEIGHTS["yolo"], out=tmp_path / "y", calibration=tmp_path, quiet=True))


# -- manifests, old and new ----------------------------------------------------------------


def test_a_manifest_written_before_variants_loads_and_serves(yolo_int8, tmp_path):
    old = tmp_path / "old"
    shutil.copytree(yolo_int8, old)
    data = json.loads((old / MANIFEST_NAME).read_text())
    del data["variants"]  # as every export wrote it before int8
    (old / MANIFEST_NAME).write_text(json.dumps(data))
    m = read_manifest(old)
    assert m.variants == [] and m.precision == "fp32"
    for precision in ("fp32", "auto"):
        d = Detector(old, backend="onnxruntime", device="cpu", precision=precision)
        assert (d.choice.variant, d.describe()["precision"]) == ("fp32", "fp32")
    with pytest.raises(ManifestError, match="no int8 variant"):
        Detector(old, backend="onnxruntime", device="cpu", precision="int8")


def test_variant_manifest_points_at_the_variant(yolo_int8):
    m = read_manifest(yolo_int8)
    cpu = next(v for v in m.variants if v.name == "int8-cpu")
    vm = variant_manifest(m, cpu)
    assert (vm.artifact, vm.artifact_sha256, vm.precision, vm.variants) == (cpu.artifact, cpu.artifact_sha256, "int8", [])
    assert (vm.input, vm.labels, vm.source) == (m.input, m.labels, m.source)
    assert Manifest.model_validate_json(m.model_dump_json()) == m


# -- precision: fp32, int8, auto --------------------------------------------------------------


def test_forced_int8_runs_the_cpu_encoding_and_finds_the_same_objects(yolo_int8):
    exact = Detector(yolo_int8, backend="onnxruntime", device="cpu")
    int8 = Detector(yolo_int8, backend="onnxruntime", device="cpu", precision="int8")
    assert int8.describe()["variant"] == "int8-cpu" and int8.describe()["precision"] == "int8"
    assert int8.manifest.artifact == "model.int8-cpu.onnx" and int8.describe()["version"] != exact.describe()["version"]
    from detserve.export.parity import compare_all

    images = [s.image for s in scenes(8, 4321)]
    a, b = exact.detect(images), int8.detect(images)
    assert sum(map(len, a)) > 0
    assert compare_all(a, b, iou=0.8).matched_share >= 0.8


def test_fastest_needs_a_variant_faster_at_every_batch_size():
    fp32 = {1: 80.0, 2: 82.0, 4: 85.0, 8: 90.0}
    assert fastest({"fp32": fp32, "int8-cpu": {1: 40.0, 2: 41.0, 4: 42.0, 8: 44.0}}, "fp32")[0] == "int8-cpu"
    # Faster on average but slower at batch 8: not chosen (never slower than fp32 where it runs).
    name, why = fastest({"fp32": fp32, "int8-cpu": {1: 20.0, 2: 20.0, 4: 20.0, 8: 95.0}}, "fp32")
    assert name == "fp32" and "every batch size" in why
    # Two that qualify: the lower mean cost.
    assert fastest({"fp32": fp32, "a": {b: 50.0 for b in fp32}, "b": {b: 45.0 for b in fp32}}, "fp32")[0] == "b"


@pytest.mark.parametrize("int8_ms, expected", [(30.0, "int8-cpu"), (300.0, "fp32")])
def test_auto_runs_what_the_timing_says(yolo_int8, int8_ms, expected):
    timed = []

    def fake_measure(pool, sizes):
        timed.append(([c.name for c in pool], list(sizes)))
        return {c.name: {b: (int8_ms if c.name == "int8-cpu" else 60.0) for b in sizes} for c in pool}

    d = Detector(yolo_int8, backend="onnxruntime", device="cpu", precision="auto", measure=fake_measure, batch_sizes=(1, 2, 4, 8))
    # Only the variant for this device whose gate passed is a candidate (int8-trt is for GPUs).
    assert timed == [(["fp32", "int8-cpu"], [1, 2, 4, 8])]
    assert d.choice.variant == expected and d.describe()["variant"] == expected
    assert d.manifest.artifact == ("model.int8-cpu.onnx" if expected == "int8-cpu" else "model.onnx")
    assert d.choice.ms_per_image["int8-cpu"][1] == int8_ms
    assert len(d.detect([np.full((200, 240, 3), 90, np.uint8)])) == 1


def test_auto_with_the_real_timing_records_both_curves(yolo_int8):
    d = Detector(yolo_int8, backend="onnxruntime", device="cpu", precision="auto", batch_sizes=(1, 2))
    costs = d.choice.ms_per_image
    assert set(costs) == {"fp32", "int8-cpu"} and all(set(c) == {1, 2} and min(c.values()) > 0 for c in costs.values())
    assert d.choice.variant in costs  # which one wins depends on this machine: that is the point


def test_choose_refuses_an_unknown_precision(yolo_int8):
    with pytest.raises(ManifestError, match="auto, fp32, int8"):
        choose(read_manifest(yolo_int8), "int4", "cpu")


def test_gpu_variants_are_not_candidates_on_cpu_and_cpu_ones_not_on_gpu(yolo_int8):
    from detserve.runtime.variants import candidates

    m = read_manifest(yolo_int8)
    assert [c.name for c in candidates(m, "cpu")] == ["fp32", "int8-cpu"]
    assert [c.name for c in candidates(m, "cuda:0")] == ["fp32"] + (["int8-trt"] if next(v for v in m.variants if v.name == "int8-trt").gate.passed else [])


# -- serving ----------------------------------------------------------------------------------


def test_the_server_says_which_variant_answers(yolo_int8):
    from starlette.testclient import TestClient

    from detserve.serve.app import Replica
    from detserve.serve.http import build_api
    from tests.conftest import encode

    server = Replica({"model": str(yolo_int8), "precision": "int8"})
    with TestClient(build_api(server), raise_server_exceptions=False) as client:
        info = client.get("/info").json()
        assert (info["variant"], info["precision"]) == ("int8-cpu", "int8")
        assert info["precision_choice"]["asked"] == "int8"
        body = client.post("/predict", content=encode(scenes(1, 9)[0].image), headers={"Content-Type": "image/png"}).json()
        assert (body["model"]["variant"], body["model"]["precision"]) == ("int8-cpu", "int8")
        assert {"name", "version", "backend", "device"} <= set(body["model"])


def test_app_args_take_precision_and_nothing_else():
    from pydantic import ValidationError

    from detserve.serve.app import AppArgs

    assert AppArgs().precision == "fp32"
    assert AppArgs(precision="auto").precision == "auto"
    with pytest.raises(ValidationError):
        AppArgs(precision="int4")


# -- labelled data for --val -------------------------------------------------------------------


def test_val_reads_yolo_txt_and_coco_json_alike(tmp_path):
    from PIL import Image

    data = scenes(3, 11)
    yolo, coco = tmp_path / "yolo", tmp_path / "coco"
    (yolo / "images").mkdir(parents=True)
    (yolo / "labels").mkdir()
    (coco / "images").mkdir(parents=True)
    entries, annotations = [], []
    for i, s in enumerate(data):
        Image.fromarray(s.image).save(yolo / "images" / f"{i}.png")
        (yolo / "labels" / f"{i}.txt").write_text(yolo_labels(s))
        Image.fromarray(s.image).save(coco / "images" / f"{i}.png")
        entries.append({"id": i + 1, "file_name": f"{i}.png", "width": s.image.shape[1], "height": s.image.shape[0]})
        for box, cls in zip(s.boxes.tolist(), s.classes.tolist()):
            annotations.append({"id": len(annotations) + 1, "image_id": i + 1, "category_id": 10 + cls, "iscrowd": 0,
                                "bbox": [box[0], box[1], box[2] - box[0], box[3] - box[1]]})  # fmt: skip
    categories = [{"id": 10 + i, "name": n} for i, n in enumerate(CLASSES)] + [{"id": 99, "name": "not-a-class"}]
    (coco / "val.json").write_text(json.dumps({"images": entries, "annotations": annotations, "categories": categories}))
    for folder in (yolo, coco):
        got = read_labelled(folder, list(CLASSES))
        assert len(got) == 3
        for g, s in zip(got, data):
            assert g.labels == [CLASSES[c] for c in s.classes]
            np.testing.assert_allclose(g.boxes, s.boxes, atol=0.01)
            assert np.array_equal(g.image, s.image)
    with pytest.raises(ValueError, match="class 7 but the model has 4"):
        (yolo / "labels" / "0.txt").write_text("7 0.5 0.5 0.1 0.1\n")
        read_labelled(yolo, list(CLASSES))


# -- TensorRT: the strongly typed int8 build (a stand-in module here; the real one skips) ------------


class _Recorder:
    """Just enough of the tensorrt module for build_engine, recording what it is asked."""

    __version__ = "10.14.1.48"

    def __init__(self):
        recorder = self
        self.network_flags, self.builder_flags = [], []

        class NetworkDefinitionCreationFlag:
            STRONGLY_TYPED = 1

        class BuilderFlag:
            FP16 = "FP16"

        class MemoryPoolType:
            WORKSPACE = "WORKSPACE"

        class Logger:
            WARNING = 2

            def __init__(self, level):
                pass

        class Tensor:
            name, shape = "images", (-1, 3, 320, 320)

        class Network:
            num_inputs = 1

            def get_input(self, i):
                return Tensor()

        class Config:
            def set_memory_pool_limit(self, *a):
                pass

            def set_flag(self, flag):
                recorder.builder_flags.append(flag)

            def add_optimization_profile(self, p):
                pass

        class Profile:
            def set_shape(self, *a):
                pass

        class Builder:
            def __init__(self, logger):
                pass

            def create_network(self, flags):
                recorder.network_flags.append(flags)
                return Network()

            def create_builder_config(self):
                return Config()

            def create_optimization_profile(self):
                return Profile()

            def build_serialized_network(self, network, config):
                return b"plan"

        class OnnxParser:
            def __init__(self, network, logger):
                pass

            def parse_from_file(self, path):
                recorder.parsed = path
                return True

        self.NetworkDefinitionCreationFlag, self.BuilderFlag, self.MemoryPoolType = NetworkDefinitionCreationFlag, BuilderFlag, MemoryPoolType
        self.Logger, self.Builder, self.OnnxParser = Logger, Builder, OnnxParser


@pytest.mark.parametrize("int8", [True, False])
def test_int8_engines_build_strongly_typed_without_precision_flags(monkeypatch, yolo_int8, tmp_path, int8):
    import torch

    fake = _Recorder()
    monkeypatch.setattr(trt_lookup, "import_tensorrt", lambda: fake)
    monkeypatch.setattr(trt_lookup, "require_gpu", lambda expected, device=0: "sm_75")
    monkeypatch.setattr(torch.cuda, "device", lambda device: nullcontext())
    source = yolo_int8 / ("model.int8-trt.onnx" if int8 else "model.onnx")
    built = trt_export.build_engine(source, tmp_path, input_name="images", chw=(3, 320, 320), fp16=True, int8=int8)
    assert fake.parsed == str(source)
    if int8:  # explicit quantization: the Q/DQ nodes and the graph's types decide; no FP16/INT8 flag
        assert fake.network_flags == [1 << 1] and fake.builder_flags == []
        assert built.precision == "int8" and built.path.name.endswith(".int8.engine")
    else:
        assert fake.network_flags == [0] and fake.builder_flags == ["FP16"]


def test_the_int8_engine_step_builds_from_the_tensorrt_encoding_and_gates_it(monkeypatch, yolo_int8, tmp_path):
    from detserve.runtime.manifest import Gate
    from detserve.runtime.pods import export_plan

    out = tmp_path / "gpu"
    shutil.copytree(yolo_int8, out)
    onnx_manifest = read_manifest(out)
    calls = {}

    def fake_build(onnx_path, out_dir, **kw):
        calls["build"] = (Path(onnx_path).name, kw["int8"], kw["fp16"])
        path = Path(out_dir) / trt_lookup.engine_filename("model.int8-trt", "sm_75", "10.14.1.48", "int8")
        path.write_bytes(b"plan")
        profile = {k: (b, 3, 320, 320) for k, b in zip(("min", "opt", "max"), (1, 8, 16))}
        return trt_export.BuiltEngine(path, "sm_75", "10.14.1.48", "int8", "images", profile, 1.0, None)

    def fake_gate(req, out, manifest, variant, calibrated, agreed_on, val, val_source, reference_metrics=None, *, backend, device):
        calls["gate"] = (variant.name, variant.format, backend, device, calibrated)
        cpu_gate = next(v.gate for v in manifest.variants if v.name == "int8-cpu")
        return Gate.model_validate({**cpu_gate.model_dump(), "passed": True}), None

    monkeypatch.setattr(trt_export, "build_engine", fake_build)
    monkeypatch.setattr(quantize, "gate_variant", fake_gate)
    req = _small_int8("yolo", out, pod="gpu-t4", format="tensorrt")
    new = trt_export.add_int8_engine(req, out, onnx_manifest, onnx_manifest, export_plan("gpu-t4", "tensorrt", "int8"))
    assert calls["build"] == ("model.int8-trt.onnx", True, False)
    trt_gate = next(v.gate for v in onnx_manifest.variants if v.name == "int8-trt")
    assert calls["gate"] == ("int8-trt-engine", "tensorrt", "tensorrt", "cuda:0", (trt_gate.calibration, trt_gate.calibration_images))
    engine = next(v for v in new.variants if v.name == "int8-trt-engine")
    assert (engine.format, engine.target, engine.built_from, engine.gpu_arch) == ("tensorrt", "gpu", "int8-trt", "sm_75")
    assert engine.batch.max == 16 and engine.gate.passed and read_manifest(out) == new


@pytest.mark.tensorrt
@pytest.mark.gpu
def test_real_int8_engine_from_the_tensorrt_encoding(yolo_int8, tmp_path):
    pytest.importorskip("tensorrt", reason="TensorRT is not installed here (NOTES.md: no TensorRT anywhere in this workplace)")
    import torch

    if not torch.cuda.is_available():
        pytest.skip("no CUDA GPU visible")
    from detserve.runtime.engines.tensorrt import TensorRTEngine

    built = trt_export.build_engine(yolo_int8 / "model.int8-trt.onnx", tmp_path, input_name="images", chw=(3, (32, 320, 320), (32, 320, 320)),
                                    batch_max=4, int8=True, fp16=False)  # fmt: skip
    m = read_manifest(yolo_int8)
    engine_manifest = m.model_copy(update={"format": "tensorrt", "artifact": built.path.name, "artifact_sha256": sha256_file(built.path),
                                           "precision": "int8", "gpu_arch": built.sm, "tensorrt_version": built.trt_version, "variants": []})  # fmt: skip
    shutil.copy(built.path, yolo_int8 / built.path.name)
    engine = Detector(yolo_int8, manifest=engine_manifest, engine=TensorRTEngine(yolo_int8 / built.path.name))
    exact = Detector(yolo_int8, backend="onnxruntime", device="cpu")
    from detserve.export.parity import compare_all

    images = [s.image for s in scenes(8, 502)]
    assert compare_all(exact.detect(images), engine.detect(images), iou=0.8).matched_share >= 0.8


# -- the full default sets -------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("family", ["yolo", "fasterrcnn"])
def test_default_models_int8_within_half_a_point_on_their_held_out_scenes(family, tmp_path):
    from detserve.export.defaults import int8_gate_sets

    m = export_model(ExportRequest(model=family, weights=WEIGHTS[family], out=tmp_path / family, quiet=True, **int8_gate_sets()))
    cpu = next(v for v in m.variants if v.name == "int8-cpu")
    assert cpu.gate.passed and cpu.gate.val.images == 200 and cpu.gate.val.drop <= 0.005
    assert cpu.kernels.int8_share >= 0.9
    assert explicit_quantization_violations(tmp_path / family / "model.int8-trt.onnx") == []


# -- the benchmark's precision section ---------------------------------------------------------------


def test_the_benchmark_reports_int8_rows_with_their_map_and_ratios():
    from detserve.benchmarks import report

    def point(c: int, ips: float, p99: float, cpu: float) -> dict:
        return {"load": "closed", "concurrency": c, "rate": None, "images_per_s": ips, "latency_ms": {"p99": p99},
                "server_cpu_ms_per_image": cpu, "errors": {}}  # fmt: skip

    ceiling = {"kind": "ceiling", "backend": "onnxruntime-cpu", "threads": 1, "batch": 1, "processes": 2, "images_per_s": 20.0,
               "ms_per_image": 95.0, "ms_per_call_p50": None, "ms_per_call_p99": None}  # fmt: skip
    results = {
        "model": {"name": "m", "map": {"fp32": {"map50_95": 0.52, "on": "scenes"}, "int8-cpu": {"map50_95": 0.518, "on": "scenes"}}},
        "raw": [ceiling, {**ceiling, "images_per_s": 38.0, "precision": "int8"}],
        "servers": {
            "detserve-http": {"variant": "fp32", "points": [point(16, 19.6, 900.0, 98.0)]},
            "detserve-auto-http": {"variant": "int8-cpu", "points": [point(16, 36.0, 500.0, 52.0)]},
            "litserve": {"variant": "fp32", "points": [point(16, 18.0, 950.0, 104.0)]},
        },
        "precision_table": {"input": "640x640", "threads": 1, "rounds": 5, "exact": "fp32",
                            "ms_per_image": {"fp32": {"1": 90.0, "8": 96.0}, "int8-cpu": {"1": 45.0, "8": 40.0}}},  # fmt: skip
    }
    rows = {r["server"]: r for r in report.precision_rows(results)}
    auto = rows["detserve-auto-http"]
    assert (auto["variant"], auto["map50_95"]) == ("int8-cpu", 0.518)
    assert auto["x_fp32_ceiling"] == pytest.approx(1.8) and auto["x_best_peer"] == pytest.approx(2.0) and auto["best_peer_p99_ms"] == 950.0
    assert rows["detserve-http"]["x_fp32_ceiling"] == pytest.approx(0.98) and rows["litserve"]["x_best_peer"] is None
    # The headline ceiling ratio stays the fp32 one: the int8 ceiling row does not raise it.
    assert report.fp32_ceiling(results)["images_per_s"] == 20.0
    md = report.markdown(results)
    assert "| detserve-auto-http | int8-cpu | 0.5180 | closed c=16 | 36.0 | 500.0 | 1.80× | 2.00× | 950.0 | 52.0 |" in md
    assert "| 8 | 96.0 | 40.0 | 2.40× |" in md  # the raw fp32 vs int8 table, per batch size
    assert "ceiling: 2 processes, decode→NMS, batch 1 (ms/image = CPU-ms), int8" in md


def test_cli_int8_flags_are_checked_before_any_work(tmp_path):
    from typer.testing import CliRunner

    from detserve.cli import app

    result = CliRunner().invoke(app, ["export", "--model", "yolo", "--weights", str(WEIGHTS["yolo"]), "--out", str(tmp_path / "o"),
                                      "--calibration", str(tmp_path)])  # fmt: skip
    assert result.exit_code == 2 and "for --precision int8" in result.output
    result = CliRunner().invoke(app, ["export", "--model", "yolo", "--weights", str(WEIGHTS["yolo"]), "--out", str(tmp_path / "p"),
                                      "--precision", "int8", "--val", str(tmp_path / "missing")])  # fmt: skip
    assert result.exit_code == 2 and "--val" in result.output and "is not a folder" in result.output


def test_export_plan_for_int8_keeps_the_pods_own_precision_for_the_exact_artifact():
    from detserve.runtime.pods import export_plan

    cpu = export_plan("regular", None, "int8")
    assert (cpu.format, cpu.precision, cpu.int8) == ("onnx", "fp32", True)
    gpu = export_plan("gpu-t4", "tensorrt", "int8")
    assert (gpu.format, gpu.precision, gpu.int8) == ("tensorrt", "fp16", True)
    assert not export_plan("regular", None, "fp32").int8
    assert trt_lookup.parse_engine_filename("model.int8-trt.sm_75.trt10.14.int8.engine").precision == "int8"
