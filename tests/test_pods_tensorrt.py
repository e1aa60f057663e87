"""Pods, export plans and the TensorRT build/load paths.

Everything above the "needs TensorRT" line runs anywhere; the rest builds real
engines and is skipped without TensorRT and a CUDA GPU.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import detserve.runtime.engines.tensorrt as trt_lookup
import detserve.export.tensorrt as trt_export
from detserve.runtime.engines.tensorrt import EngineMismatch, TensorRTEngine, check_compatible
from detserve.runtime.manifest import (
    BatchSpec,
    InputSpec,
    Manifest,
    OutputSpec,
    Parity,
    SourceSpec,
    read_manifest,
    sha256_file,
    write_manifest,
)
from detserve.runtime.pods import PODS, TENSORRT_PIN, export_plan, get_pod, sm_from_capability
from detserve.runtime.engines.tensorrt import (
    GpuMismatch,
    TensorRTUnavailable,
    engine_filename,
    parse_engine_filename,
    timing_cache_filename,
    trt_major_minor,
    trt_version_matches,
)
from detserve.export.pipeline import ExportError, ExportRequest
from detserve.export.tensorrt import (
    FASTERRCNN_MIN_SIDE,
    BuiltEngine,
    build_engine,
    build_for_manifest,
    check_profile_against_input,
    manifest_profile,
    profile_shapes,
)
from tests.conftest import ROOT


# -- the pod table -------------------------------------------------------------


def test_pod_table_has_the_dataloop_pods():
    assert set(PODS) == {"regular", "gpu-t4", "gpu-v100", "gpu-a100"}
    for name, pod in PODS.items():
        assert pod.name == name
        assert 1 <= pod.opt_batch <= pod.max_batch
        assert (pod.kind == "gpu") == (pod.sm is not None) == (pod.gpu is not None)


def test_gpu_pods_architectures_and_backends():
    t4, a100 = PODS["gpu-t4"], PODS["gpu-a100"]
    assert (t4.gpu, t4.sm, t4.tensorrt_supported, t4.backend, t4.precision) == ("T4", "sm_75", True, "tensorrt", "fp16")
    assert (a100.gpu, a100.sm, a100.tensorrt_supported, a100.backend) == ("A100", "sm_80", True, "tensorrt")
    assert t4.dataloop_pod_type == "gpu-t4"


def test_v100_falls_back_to_onnxruntime_cuda_fp16():
    v100 = get_pod("gpu-v100")
    assert v100.sm == "sm_70"
    assert v100.tensorrt_supported is False
    assert (v100.backend, v100.precision) == ("onnxruntime-cuda", "fp16")
    assert "Volta" in v100.note and "10.5" in v100.note


def test_regular_pod_is_cpu_onnxruntime():
    pod = get_pod("regular")
    assert (pod.kind, pod.gpu, pod.sm, pod.tensorrt_supported) == ("cpu", None, None, False)
    assert (pod.backend, pod.precision) == ("onnxruntime-cpu", "fp32")
    assert pod.dataloop_pod_type.startswith("regular-")


def test_unknown_pod_lists_valid_names():
    with pytest.raises(ValueError) as err:
        get_pod("gpu-h100")
    for name in PODS:
        assert name in str(err.value)


@pytest.mark.parametrize(("capability", "sm"), [((7, 5), "sm_75"), ((8, 0), "sm_80"), ((7, 0), "sm_70"), ((10, 0), "sm_100")])
def test_sm_from_capability(capability, sm):
    assert sm_from_capability(capability) == sm


@pytest.mark.parametrize("bad", [(0, 5), (7, 10), (7.5, 0)])
def test_sm_from_capability_rejects_nonsense(bad):
    with pytest.raises(ValueError):
        sm_from_capability(bad)


# -- export plans --------------------------------------------------------------


def test_plan_tensorrt_on_v100_becomes_onnx_cuda_fp16_with_reason():
    plan = export_plan("gpu-v100", "tensorrt", None)
    assert (plan.format, plan.backend, plan.precision, plan.gpu_arch) == ("onnx", "onnxruntime-cuda", "fp16", None)
    assert plan.changed
    assert "Volta" in plan.reason and "sm_70" in plan.reason and "10.5" in plan.reason and "CUDA 13" in plan.reason


def test_plan_v100_keeps_an_explicit_precision():
    plan = export_plan("gpu-v100", "tensorrt", "fp16")
    assert (plan.format, plan.precision) == ("onnx", "fp16")
    assert export_plan("gpu-v100", "tensorrt", "fp32").precision == "fp32"


def test_plan_default_on_v100_is_the_fallback_too():
    plan = export_plan("gpu-v100")
    assert (plan.format, plan.backend, plan.precision) == ("onnx", "onnxruntime-cuda", "fp16")


@pytest.mark.parametrize(("pod", "sm"), [("gpu-t4", "sm_75"), ("gpu-a100", "sm_80")])
def test_plan_tensorrt_on_turing_and_ampere(pod, sm):
    plan = export_plan(pod, "tensorrt", None)
    assert (plan.format, plan.backend, plan.precision, plan.gpu_arch) == ("tensorrt", "tensorrt", "fp16", sm)
    assert not plan.changed
    assert plan.max_batch == PODS[pod].max_batch
    assert export_plan(pod, "tensorrt", "fp32").precision == "fp32"
    assert export_plan(pod).format == "tensorrt"  # the pod's preference


def test_plan_onnx_on_a_gpu_pod_uses_onnxruntime_cuda():
    plan = export_plan("gpu-t4", "onnx", "fp32")
    assert (plan.format, plan.backend, plan.precision, plan.gpu_arch, plan.reason) == (
        "onnx",
        "onnxruntime-cuda",
        "fp32",
        None,
        "",
    )


def test_plan_tensorrt_on_cpu_pod_is_refused():
    with pytest.raises(ValueError) as err:
        export_plan("regular", "tensorrt", "fp16")
    message = str(err.value)
    assert "GPU pod" in message and "--format onnx" in message and "gpu-t4" in message


def test_plan_regular_onnx():
    plan = export_plan("regular", "onnx", "fp32")
    assert (plan.format, plan.backend, plan.precision, plan.reason) == ("onnx", "onnxruntime-cpu", "fp32", "")
    assert export_plan("regular").format == "onnx"


def test_plan_fp16_on_cpu_builds_fp32_and_says_why():
    plan = export_plan("regular", "onnx", "fp16")
    assert plan.precision == "fp32"
    assert "fp16" in plan.reason and "CPU" in plan.reason


@pytest.mark.parametrize(("fmt", "precision", "word"), [("engine", None, "format"), ("onnx", "int4", "precision")])
def test_plan_rejects_unknown_values(fmt, precision, word):
    with pytest.raises(ValueError, match=word):
        export_plan("gpu-t4", fmt, precision)


def test_plan_unknown_pod():
    with pytest.raises(ValueError, match="unknown pod"):
        export_plan("gpu-k80", "onnx", "fp32")


# -- profile shapes ------------------------------------------------------------


def test_profile_shapes_static_hw():
    assert profile_shapes((3, 640, 640), 1, 8, 16) == {
        "min": (1, 3, 640, 640),
        "opt": (8, 3, 640, 640),
        "max": (16, 3, 640, 640),
    }


def test_profile_shapes_dynamic_hw():
    shapes = profile_shapes((3, (320, 640, 1024), (256, 640, 1344)), 1, 1, 1)
    assert shapes == {"min": (1, 3, 320, 256), "opt": (1, 3, 640, 640), "max": (1, 3, 1024, 1344)}


@pytest.mark.parametrize(
    ("chw", "batch", "match"),
    [
        ((3, 640, 640), (0, 1, 4), "batch"),
        ((3, 640, 640), (2, 1, 4), "min <= opt <= max"),
        ((3, 640, 640), (1, 8, 4), "min <= opt <= max"),
        ((3, 640), (1, 1, 1), "chw"),
        ((3, 0, 640), (1, 1, 1), "height"),
        ((3, (640, 320, 1024), 640), (1, 1, 1), "height"),
        ((3, 640, (320, 640, 512)), (1, 1, 1), "width"),
    ],
)
def test_profile_shapes_rejects_bad_ranges(chw, batch, match):
    with pytest.raises(ValueError, match=match):
        profile_shapes(chw, *batch)


def test_profile_fits_a_dynamic_input():
    shapes = profile_shapes((3, 640, 640), 1, 4, 8)
    assert check_profile_against_input("images", (-1, 3, 640, 640), shapes) == shapes


def test_profile_refuses_a_fixed_batch():
    with pytest.raises(ValueError, match="fixed batch of 1"):
        check_profile_against_input("images", (1, 3, 640, 640), profile_shapes((3, 640, 640), 1, 4, 8))


def test_profile_for_a_chw_input_drops_the_batch():
    shapes = profile_shapes((3, (320, 800, 1333), (320, 800, 1333)), 1, 1, 1)
    fitted = check_profile_against_input("images", (3, -1, -1), shapes)
    assert fitted == {"min": (3, 320, 320), "opt": (3, 800, 800), "max": (3, 1333, 1333)}
    with pytest.raises(ValueError, match="no batch axis"):
        check_profile_against_input("images", (3, -1, -1), profile_shapes((3, 800, 800), 1, 2, 4))


# -- names and versions --------------------------------------------------------


def test_engine_filename_round_trip():
    name = engine_filename("yolo11n", "sm_75", "10.14.1.48.post1", "fp16")
    assert name == "yolo11n.sm_75.trt10.14.fp16.engine"
    parsed = parse_engine_filename(Path("/models/x") / name)
    assert (parsed.stem, parsed.sm, parsed.trt, parsed.precision) == ("yolo11n", "sm_75", "10.14", "fp16")


def test_engine_filename_keeps_dots_in_the_stem():
    name = engine_filename("model.v2", "sm_80", "10.14.1", "fp32")
    assert parse_engine_filename(name).stem == "model.v2"
    assert parse_engine_filename(name).sm == "sm_80"


@pytest.mark.parametrize(
    "args", [("m", "75", "10.14", "fp16"), ("m", "sm_75", "ten", "fp16"), ("m", "sm_75", "10.14", "int4"), ("", "sm_75", "10.14", "fp16")]
)
def test_engine_filename_rejects_bad_parts(args):
    with pytest.raises(ValueError):
        engine_filename(*args)


@pytest.mark.parametrize("name", ["model.engine", "model.onnx", "model.sm_75.fp16.engine", "model.sm_75.trt10.fp16.engine"])
def test_parse_engine_filename_rejects_other_names(name):
    with pytest.raises(ValueError, match="not a detserve engine name"):
        parse_engine_filename(name)


def test_timing_cache_filename():
    assert timing_cache_filename("sm_75", "10.14.1.48") == "timing.sm_75.trt10.14.cache"
    assert timing_cache_filename("sm_80", "10.14.1.48") != timing_cache_filename("sm_75", "10.14.1.48")


def test_trt_versions():
    assert trt_major_minor("10.14.1.48.post1") == "10.14"
    assert trt_version_matches("10.14", "10.14.1.48")
    assert trt_version_matches("10.14.1.48.post1", "10.14.1.48")
    assert not trt_version_matches("10.14", "10.15.0.1")
    assert not trt_version_matches("10.14.1.48", "10.14.2.1")
    with pytest.raises(ValueError):
        trt_major_minor("latest")


# -- build_engine refusals (no TensorRT needed) --------------------------------


@pytest.fixture
def onnx_file(tmp_path: Path) -> Path:
    path = tmp_path / "model.onnx"
    path.write_bytes(b"not really onnx")  # the refusals come before parsing
    return path


def test_build_engine_without_tensorrt_says_how_to_install(monkeypatch, onnx_file, tmp_path):
    monkeypatch.setitem(sys.modules, "tensorrt", None)  # makes `import tensorrt` fail, here and on GPU machines
    with pytest.raises(TensorRTUnavailable) as err:
        build_engine(onnx_file, tmp_path / "out", input_name="images", chw=(3, 64, 64), expected_sm="sm_75")
    message = str(err.value)
    assert "pip install 'detserve[gpu]'" in message
    assert "NVIDIA" in message and "onnxruntime" in message and "tensorrt-cu13==10.14.1.48.post1" in message


def test_build_engine_checks_arguments_before_tensorrt(monkeypatch, onnx_file, tmp_path):
    monkeypatch.setitem(sys.modules, "tensorrt", None)
    with pytest.raises(ValueError, match="min <= opt <= max"):
        build_engine(onnx_file, tmp_path, input_name="images", chw=(3, 64, 64), batch_min=4, batch_opt=1, batch_max=8)
    with pytest.raises(FileNotFoundError, match="export the ONNX model first"):
        build_engine(tmp_path / "missing.onnx", tmp_path, input_name="images", chw=(3, 64, 64))


class _FakeTensorRT:
    __version__ = "10.14.1.48"


def test_build_engine_refuses_another_gpu_architecture(monkeypatch, onnx_file, tmp_path):
    monkeypatch.setattr(trt_lookup, "import_tensorrt", lambda: _FakeTensorRT)
    monkeypatch.setattr(trt_lookup, "current_gpu_sm", lambda device=0: "sm_80")
    monkeypatch.setattr(trt_lookup, "gpu_name", lambda device=0: "NVIDIA A100-SXM4-40GB")
    with pytest.raises(GpuMismatch) as err:
        build_engine(onnx_file, tmp_path, input_name="images", chw=(3, 64, 64), expected_sm="sm_75")
    message = str(err.value)
    assert "sm_80" in message and "sm_75" in message and "gpu-t4" in message and "A100" in message
    assert "Build on a sm_75 GPU" in message


def test_build_engine_without_a_gpu(monkeypatch, onnx_file, tmp_path):
    monkeypatch.setattr(trt_lookup, "import_tensorrt", lambda: _FakeTensorRT)
    monkeypatch.setattr(trt_lookup, "current_gpu_sm", lambda device=0: None)
    with pytest.raises(TensorRTUnavailable, match="needs a CUDA GPU"):
        build_engine(onnx_file, tmp_path, input_name="images", chw=(3, 64, 64), expected_sm="sm_75")


# -- TensorRTEngine refusals (no TensorRT needed) ------------------------------


@pytest.fixture
def t4_engine(tmp_path: Path) -> Path:
    path = tmp_path / engine_filename("yolo11n", "sm_75", "10.14.1.48", "fp16")
    path.write_bytes(b"serialized engine")
    return path


def _machine(monkeypatch, sm: str | None, trt: str | None) -> None:
    # One place for the builder and the engine alike: both look these up through detserve.runtime.engines.tensorrt.
    monkeypatch.setattr(trt_lookup, "current_gpu_sm", lambda device=0: sm)
    monkeypatch.setattr(trt_lookup, "installed_tensorrt_version", lambda: trt)
    monkeypatch.setattr(trt_lookup, "gpu_name", lambda device=0: "NVIDIA A100-SXM4-40GB")


def test_engine_refuses_another_gpu_architecture(monkeypatch, t4_engine):
    _machine(monkeypatch, "sm_80", "10.14.1.48")
    with pytest.raises(EngineMismatch) as err:
        TensorRTEngine(t4_engine)
    message = str(err.value)
    assert "built for sm_75" in message and "is sm_80" in message and "gpu-t4" in message and "gpu-a100" in message


def test_engine_refuses_another_tensorrt_version(monkeypatch, t4_engine):
    _machine(monkeypatch, "sm_75", "10.15.0.1")
    with pytest.raises(EngineMismatch) as err:
        TensorRTEngine(t4_engine)
    message = str(err.value)
    assert "TensorRT 10.14" in message and "10.15.0.1" in message and "tensorrt-cu13==10.14.1.48.post1" in message


def test_engine_refuses_a_full_version_mismatch_from_the_manifest(monkeypatch, t4_engine):
    # The file name carries major.minor; the manifest's full version is stricter.
    _machine(monkeypatch, "sm_75", "10.14.2.1")
    with pytest.raises(EngineMismatch, match="10.14.1.48"):
        TensorRTEngine(t4_engine, expected_sm="sm_75", expected_trt="10.14.1.48")


def test_engine_refuses_when_name_and_manifest_disagree(monkeypatch, t4_engine):
    _machine(monkeypatch, "sm_80", "10.14.1.48")
    with pytest.raises(EngineMismatch, match="renamed or the manifest edited"):
        TensorRTEngine(t4_engine, expected_sm="sm_80", expected_trt="10.14.1.48")


def test_engine_without_name_or_expectations_is_refused(monkeypatch, tmp_path):
    _machine(monkeypatch, "sm_75", "10.14.1.48")
    path = tmp_path / "model.engine"
    path.write_bytes(b"x")
    with pytest.raises(EngineMismatch, match="cannot tell"):
        TensorRTEngine(path)
    # The manifest's values are enough on their own.
    assert check_compatible(path, "sm_75", "10.14.1.48") == ("sm_75", "10.14.1.48")


def test_engine_accepts_empty_expectations_and_uses_the_name(monkeypatch, t4_engine):
    # detserve.runtime.engines.load_engine passes "" when the manifest has no gpu_arch.
    _machine(monkeypatch, "sm_75", "10.14.1.48")
    assert check_compatible(t4_engine, "", "") == ("sm_75", "10.14.1.48")


def test_engine_without_tensorrt_or_gpu(monkeypatch, t4_engine):
    _machine(monkeypatch, "sm_75", None)
    with pytest.raises(TensorRTUnavailable, match="detserve\\[gpu\\]"):
        TensorRTEngine(t4_engine)
    _machine(monkeypatch, None, "10.14.1.48")
    with pytest.raises(TensorRTUnavailable, match="CUDA GPU"):
        TensorRTEngine(t4_engine)


def test_engine_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError):
        TensorRTEngine(tmp_path / "nope.sm_75.trt10.14.fp16.engine")


def test_modules_import_without_tensorrt_or_cuda():
    code = (
        "import sys, detserve.runtime.pods, detserve.runtime.engines.tensorrt, detserve.export.tensorrt; "
        "assert 'tensorrt' not in sys.modules, 'tensorrt imported'; "
        "torch = sys.modules.get('torch'); "
        "assert torch is None or not torch.cuda.is_initialized(), 'CUDA initialised'"
    )
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr


# (the runtime never importing the export stage: tests/test_layers.py)


def test_export_reexports_the_pure_helpers_only():
    for name in ("engine_filename", "parse_engine_filename", "timing_cache_filename", "trt_major_minor", "trt_version_matches",
                 "EngineName", "TensorRTUnavailable", "TensorRTBuildError", "GpuMismatch"):
        assert getattr(trt_export, name) is getattr(trt_lookup, name)
    # The machine lookups live in one place only, so a test replaces them once.
    for name in ("current_gpu_sm", "installed_tensorrt_version", "import_tensorrt", "gpu_name", "require_gpu"):
        assert not hasattr(trt_export, name)


def test_one_patch_reaches_the_builder_and_the_engine(monkeypatch, onnx_file, t4_engine, tmp_path):
    _machine(monkeypatch, "sm_80", "10.14.1.48")
    monkeypatch.setattr(trt_lookup, "import_tensorrt", lambda: _FakeTensorRT)
    with pytest.raises(GpuMismatch, match="is sm_80"):
        build_engine(onnx_file, tmp_path, input_name="images", chw=(3, 64, 64), expected_sm="sm_75")
    with pytest.raises(EngineMismatch, match="is sm_80"):
        TensorRTEngine(t4_engine)


# -- build_for_manifest: the export pipeline's TensorRT step (no TensorRT needed) ---------


def _onnx_manifest(family: str = "yolo", **update) -> Manifest:
    if family == "yolo":
        spec = InputSpec(resize="letterbox", imgsz=640)
        output = OutputSpec(kind="yolo_raw", names=["output0"])
        batch = BatchSpec(min=1, opt=8, max=16, dynamic=True, note="one graph for any batch size up to max")
        source = SourceSpec(file="source.pt", sha256="0" * 64, kind="ultralytics")
    else:
        spec = InputSpec(resize="rcnn", min_size=800, max_size=1333, mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225))
        output = OutputSpec(kind="fasterrcnn", names=["boxes", "scores", "labels", "num_detections"], min_score=0.05)
        batch = BatchSpec(min=1, opt=8, max=16, dynamic=True)
        source = SourceSpec(file="source.pth", sha256="0" * 64, kind="torchvision_random_init")
    manifest = Manifest(
        name="m",
        family=family,
        arch="a",
        labels={0: "circle"} if family == "yolo" else {1: "circle"},
        format="onnx",
        artifact="model.onnx",
        artifact_sha256="1" * 64,
        precision="fp16",
        opset=17,
        pod="gpu-t4",
        gpu_arch="sm_75",
        input=spec,
        output=output,
        batch=batch,
        source=source,
        versions={"onnx": "1.19.0"},
    )
    return manifest.model_copy(update=update)


@pytest.fixture
def onnx_out(tmp_path: Path) -> Path:
    out = tmp_path / "export"
    out.mkdir()
    (out / "model.onnx").write_bytes(b"onnx graph")
    return out


class _FakeBuilder:
    """Stands in for build_engine: checks the profile against the graph's input and writes a file."""

    def __init__(self, input_shape: tuple[int, ...], sm: str = "sm_75", trt_version: str = "10.14.1.48"):
        self.input_shape, self.sm, self.trt_version = input_shape, sm, trt_version
        self.calls: list[dict] = []

    def __call__(self, onnx_path, out_dir, **kwargs):
        self.calls.append({"onnx_path": Path(onnx_path), "out_dir": Path(out_dir), **kwargs})
        assert Path(onnx_path).is_file()
        profile = check_profile_against_input(
            kwargs["input_name"],
            self.input_shape,
            profile_shapes(kwargs["chw"], kwargs["batch_min"], kwargs["batch_opt"], kwargs["batch_max"]),
        )
        precision = "fp16" if kwargs["fp16"] else "fp32"
        path = Path(out_dir) / engine_filename(Path(onnx_path).stem, self.sm, self.trt_version, precision)
        path.write_bytes(b"serialized engine " + precision.encode())
        cache = Path(kwargs["timing_cache"]) / timing_cache_filename(self.sm, self.trt_version)
        cache.write_bytes(b"cache")
        return BuiltEngine(path, self.sm, self.trt_version, precision, kwargs["input_name"], profile, 1.0, cache)


def _passing_parity(calls: list | None = None, passed: bool = True):
    def parity(req, out, manifest, **kwargs):
        if calls is not None:
            calls.append(manifest)
        share = 1.0 if passed else 0.5
        return Parity(images=8, source_boxes=10, matched_share=share, max_box_diff_px=0.01, max_score_diff=1e-4,
                      threshold=req.parity_threshold, conf=0.25, passed=passed)

    return parity


def _req(out: Path, **kw) -> ExportRequest:
    return ExportRequest(model=kw.pop("model", "yolo"), weights=None, out=out, format="tensorrt", pod="gpu-t4", quiet=True, **kw)


def test_build_for_manifest_yolo_updates_the_manifest(monkeypatch, onnx_out):
    builder, checked = _FakeBuilder((-1, 3, 640, 640)), []
    monkeypatch.setattr(trt_export, "build_engine", builder)
    monkeypatch.setattr(trt_export, "engine_parity", _passing_parity(checked))
    plan = export_plan("gpu-t4", "tensorrt", None)
    manifest = _onnx_manifest()
    write_manifest(onnx_out, manifest)

    new = build_for_manifest(_req(onnx_out), onnx_out, manifest, plan)

    (call,) = builder.calls
    assert call["onnx_path"] == onnx_out / "model.onnx" and call["out_dir"] == onnx_out
    assert (call["input_name"], call["chw"]) == ("images", (3, 640, 640))
    assert (call["batch_min"], call["batch_opt"], call["batch_max"]) == (1, 8, 16)
    assert call["fp16"] is True and call["expected_sm"] == "sm_75" and call["timing_cache"] == onnx_out
    engine = onnx_out / "model.sm_75.trt10.14.fp16.engine"
    assert (new.format, new.artifact, new.artifact_sha256) == ("tensorrt", engine.name, sha256_file(engine))
    assert (new.gpu_arch, new.tensorrt_version, new.precision) == ("sm_75", "10.14.1.48", "fp16")
    assert (new.batch.min, new.batch.opt, new.batch.max, new.batch.dynamic) == (1, 8, 16, True)
    assert new.versions == {"onnx": "1.19.0", "tensorrt": "10.14.1.48"}
    assert new.parity is not None and new.parity.passed and checked[0].artifact == engine.name
    # Everything else is the ONNX export's; the ONNX file stays beside the engine.
    assert (new.input, new.output, new.source, new.labels, new.name) == (manifest.input, manifest.output, manifest.source, manifest.labels, manifest.name)
    assert (onnx_out / "model.onnx").is_file() and (onnx_out / "timing.sm_75.trt10.14.cache").is_file()
    assert read_manifest(onnx_out) == new


def test_build_for_manifest_fp32_and_a_smaller_max_batch(monkeypatch, onnx_out):
    builder = _FakeBuilder((-1, 3, 320, 320))
    monkeypatch.setattr(trt_export, "build_engine", builder)
    monkeypatch.setattr(trt_export, "engine_parity", _passing_parity())
    # --max-batch 4 went into the manifest; the pod's opt (8) is clamped into it.
    manifest = _onnx_manifest(input=InputSpec(resize="letterbox", imgsz=320), batch=BatchSpec(min=1, opt=8, max=4, dynamic=True))
    new = build_for_manifest(_req(onnx_out, max_batch=4), onnx_out, manifest, export_plan("gpu-a100", "tensorrt", "fp32"))
    assert builder.calls[0]["fp16"] is False and builder.calls[0]["expected_sm"] == "sm_80"
    assert (new.batch.min, new.batch.opt, new.batch.max) == (1, 4, 4)
    assert new.precision == "fp32" and new.artifact.endswith(".fp32.engine")


def test_fasterrcnn_profile_fits_its_graph_and_the_parity_images():
    from detserve.runtime.batched_rcnn import resize_and_batch

    manifest = _onnx_manifest("fasterrcnn")
    chw, batch = manifest_profile(manifest, export_plan("gpu-t4", "tensorrt", None))
    assert batch == (1, 8, 16)
    assert chw == (3, (FASTERRCNN_MIN_SIDE, 800, 1344), (FASTERRCNN_MIN_SIDE, 1088, 1344))
    # The batched graph's input is [N, 3, H, W], all dynamic.
    fitted = check_profile_against_input("images", (-1, 3, -1, -1), profile_shapes(chw, *batch))
    low, high = fitted["min"], fitted["max"]
    # What the host sends for: Detector.warmup (64 x 64), scenes, bus.jpg, zidane.jpg, 1080p, a thin strip.
    for h, w in ((64, 64), (200, 480), (1080, 810), (720, 1280), (1080, 1920), (1920, 1080), (40, 4000)):
        image = np.zeros((h, w, 3), np.uint8)
        x, _, _ = resize_and_batch([image], manifest.input.min_size, manifest.input.max_size, manifest.input.stride)
        assert all(lo <= d <= hi for d, lo, hi in zip(x.shape, low, high)), (h, w, x.shape)


def test_build_for_manifest_fasterrcnn_batches(monkeypatch, onnx_out):
    builder = _FakeBuilder((-1, 3, -1, -1))
    monkeypatch.setattr(trt_export, "build_engine", builder)
    monkeypatch.setattr(trt_export, "engine_parity", _passing_parity())
    new = build_for_manifest(_req(onnx_out, model="fasterrcnn"), onnx_out, _onnx_manifest("fasterrcnn"), export_plan("gpu-t4", "tensorrt", None))
    assert (builder.calls[0]["batch_min"], builder.calls[0]["batch_opt"], builder.calls[0]["batch_max"]) == (1, 8, 16)
    assert (new.batch.min, new.batch.opt, new.batch.max) == (1, 8, 16)
    assert (new.format, new.input.resize, new.output.kind) == ("tensorrt", "rcnn", "fasterrcnn")


def test_build_for_manifest_without_tensorrt_is_an_export_error_with_the_install_hint(monkeypatch, onnx_out):
    monkeypatch.setitem(sys.modules, "tensorrt", None)  # the real build_engine, on a machine without TensorRT
    manifest = _onnx_manifest()
    write_manifest(onnx_out, manifest)
    with pytest.raises(ExportError) as err:
        build_for_manifest(_req(onnx_out), onnx_out, manifest, export_plan("gpu-t4", "tensorrt", None))
    message = str(err.value)
    assert "\n" not in message
    assert "pip install 'detserve[gpu]'" in message and TENSORRT_PIN in message and "NVIDIA" in message
    assert "onnxruntime" in message and str(onnx_out) in message
    # Nothing changed: the folder is still the working ONNX export.
    assert read_manifest(onnx_out) == manifest
    assert sorted(p.name for p in onnx_out.iterdir()) == ["manifest.json", "model.onnx"]


def test_build_for_manifest_on_the_wrong_gpu_is_one_line(monkeypatch, onnx_out):
    monkeypatch.setattr(trt_lookup, "import_tensorrt", lambda: _FakeTensorRT)
    monkeypatch.setattr(trt_lookup, "current_gpu_sm", lambda device=0: "sm_80")
    monkeypatch.setattr(trt_lookup, "gpu_name", lambda device=0: "NVIDIA A100-SXM4-40GB")
    with pytest.raises(ExportError) as err:
        build_for_manifest(_req(onnx_out), onnx_out, _onnx_manifest(), export_plan("gpu-t4", "tensorrt", None))
    message = str(err.value)
    assert "\n" not in message and "build failed" in message
    assert "sm_80" in message and "sm_75" in message and "gpu-t4" in message


def test_build_for_manifest_without_a_gpu(monkeypatch, onnx_out):
    monkeypatch.setattr(trt_lookup, "import_tensorrt", lambda: _FakeTensorRT)
    monkeypatch.setattr(trt_lookup, "current_gpu_sm", lambda device=0: None)
    with pytest.raises(ExportError, match="needs a CUDA GPU"):
        build_for_manifest(_req(onnx_out), onnx_out, _onnx_manifest(), export_plan("gpu-t4", "tensorrt", None))


def test_build_for_manifest_refuses_bad_inputs(onnx_out):
    with pytest.raises(ExportError, match="not a TensorRT engine"):
        build_for_manifest(_req(onnx_out), onnx_out, _onnx_manifest(), export_plan("gpu-t4", "onnx", None))
    no_size = _onnx_manifest(input=InputSpec(resize="letterbox", imgsz=None))
    with pytest.raises(ExportError, match="imgsz"):
        build_for_manifest(_req(onnx_out), onnx_out, no_size, export_plan("gpu-t4", "tensorrt", None))


def test_build_for_manifest_failed_parity_keeps_the_figures(monkeypatch, onnx_out):
    monkeypatch.setattr(trt_export, "build_engine", _FakeBuilder((-1, 3, 640, 640)))
    monkeypatch.setattr(trt_export, "engine_parity", _passing_parity(passed=False))
    write_manifest(onnx_out, _onnx_manifest())
    with pytest.raises(ExportError) as err:
        build_for_manifest(_req(onnx_out), onnx_out, _onnx_manifest(), export_plan("gpu-t4", "tensorrt", None))
    message = str(err.value)
    assert "\n" not in message and "50.0%" in message and "--precision fp32" in message and "--parity-threshold" in message
    written = read_manifest(onnx_out)
    assert written.format == "tensorrt" and written.parity is not None and not written.parity.passed


def test_build_for_manifest_engine_that_does_not_load(monkeypatch, onnx_out):
    monkeypatch.setattr(trt_export, "build_engine", _FakeBuilder((-1, 3, 640, 640)))
    _machine(monkeypatch, "sm_75", "10.15.0.1")  # the real TensorRTEngine refuses before touching TensorRT
    manifest = _onnx_manifest()
    write_manifest(onnx_out, manifest)
    with pytest.raises(ExportError) as err:
        build_for_manifest(_req(onnx_out, parity_images=[np.zeros((64, 64, 3), np.uint8)]), onnx_out, manifest, export_plan("gpu-t4", "tensorrt", None))
    message = str(err.value)
    assert "\n" not in message and "does not load here" in message and "10.15.0.1" in message
    assert read_manifest(onnx_out) == manifest


@pytest.fixture(scope="module")
def yolo_tensorrt_export(tmp_path_factory) -> tuple[Path, Manifest, dict]:
    """A real `export --format tensorrt --pod gpu-t4` of a random-init YOLO, with the TensorRT parts faked.

    build_engine writes a placeholder engine file, and the "TensorRT engine"
    that engine_parity loads is onnxruntime on the ONNX export: everything but
    TensorRT itself (manifest, Detector, reference, parity) runs for real.
    """
    from detserve.runtime.engines.onnx import OnnxEngine
    from detserve.export.pipeline import export_model

    # Ultralytics' dynamic export: batch, height and width all dynamic.
    seen: dict = {"builder": _FakeBuilder((-1, 3, -1, -1)), "engines": []}

    def fake_engine(path, **kwargs):
        seen["engines"].append((Path(path), kwargs))
        folder = Path(path).parent
        return OnnxEngine(folder, read_manifest(folder), device="cpu")  # manifest.json is still the ONNX one here

    out = tmp_path_factory.mktemp("trt") / "yolo"
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(trt_export, "build_engine", seen["builder"])
        mp.setattr(trt_export, "TensorRTEngine", fake_engine)
        # Random init scores low: a low conf gives the parity check boxes to match.
        manifest = export_model(_req(out, imgsz=128, parity_conf=1e-4))
    return out, manifest, seen


def test_export_model_tensorrt_end_to_end_with_a_fake_builder(yolo_tensorrt_export):
    out, manifest, seen = yolo_tensorrt_export
    engine = out / "model.sm_75.trt10.14.fp16.engine"
    assert (manifest.format, manifest.artifact, manifest.artifact_sha256) == ("tensorrt", engine.name, sha256_file(engine))
    assert (manifest.gpu_arch, manifest.tensorrt_version, manifest.precision, manifest.pod) == ("sm_75", "10.14.1.48", "fp16", "gpu-t4")
    assert (manifest.batch.min, manifest.batch.opt, manifest.batch.max) == (1, PODS["gpu-t4"].opt_batch, PODS["gpu-t4"].max_batch)
    # GPU pods export the square letterbox (issue 13): a fixed imgsz x imgsz input.
    assert manifest.input.rect is False
    assert seen["builder"].calls[0]["chw"] == (3, 128, 128)
    ((path, kwargs),) = seen["engines"]
    assert path == engine and kwargs["expected_sm"] == "sm_75" and kwargs["expected_trt"] == "10.14.1.48"
    parity = manifest.parity
    assert parity is not None and parity.passed and parity.source_boxes > 0 and parity.matched_share == 1.0
    assert parity.images == 8 and parity.conf == 1e-4 and parity.threshold == 0.99
    assert read_manifest(out) == manifest
    assert {"model.onnx", "source.pt", "manifest.json", engine.name} <= {p.name for p in out.iterdir()}


# -- needs TensorRT and a CUDA GPU ---------------------------------------------


@pytest.fixture(scope="module")
def gpu_sm() -> str:
    pytest.importorskip("tensorrt", reason="TensorRT is not installed (pip install 'detserve[gpu]' on a GPU machine)")
    torch = pytest.importorskip("torch")
    if not torch.cuda.is_available():
        pytest.skip("no CUDA GPU visible")
    return sm_from_capability(torch.cuda.get_device_capability(0))


def _export_conv(path: Path) -> Path:
    import torch

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.ReLU(), torch.nn.Conv2d(8, 4, 1)).eval()
    torch.onnx.export(
        model,
        (torch.randn(1, 3, 32, 32),),
        str(path),
        input_names=["images"],
        output_names=["out"],
        dynamic_axes={"images": {0: "batch"}, "out": {0: "batch"}},
        opset_version=17,
        dynamo=False,
    )
    return path


def _onnxruntime(path: Path, batch: np.ndarray) -> list[np.ndarray]:
    os.environ.setdefault("ORT_DISABLE_TELEMETRY", "1")
    import onnxruntime as ort

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return session.run(None, {session.get_inputs()[0].name: batch})


@pytest.mark.tensorrt
@pytest.mark.gpu
def test_build_and_run_matches_onnxruntime(gpu_sm, tmp_path):
    onnx_path = _export_conv(tmp_path / "conv.onnx")
    steps: list[str] = []
    built = build_engine(
        onnx_path,
        tmp_path / "engines",
        input_name="images",
        chw=(3, 32, 32),
        batch_min=1,
        batch_opt=2,
        batch_max=4,
        fp16=False,
        workspace_gb=1,
        timing_cache=tmp_path / "cache",
        expected_sm=gpu_sm,
        progress=steps.append,
    )
    assert built.path.is_file() and built.sm == gpu_sm and built.max_batch == 4
    assert parse_engine_filename(built.path).sm == gpu_sm
    assert built.timing_cache is not None and built.timing_cache.is_file()
    assert built.timing_cache.name == timing_cache_filename(gpu_sm, built.trt_version)
    assert steps and built.profile["opt"] == (2, 3, 32, 32)

    engine = TensorRTEngine(built.path, expected_sm=gpu_sm, expected_trt=built.trt_version)
    assert (engine.name, engine.device, engine.max_batch) == ("tensorrt", "cuda:0", 4)
    assert (engine.input_name, engine.output_names) == ("images", ["out"])
    rng = np.random.default_rng(0)
    for n in (3, 1, 4):  # a smaller batch after a larger one: outputs sliced to the batch
        batch = rng.standard_normal((n, 3, 32, 32), dtype=np.float32)
        (got,) = engine.run(batch)
        (want,) = _onnxruntime(onnx_path, batch)
        assert got.shape == want.shape == (n, 4, 32, 32)
        np.testing.assert_allclose(got, want, rtol=1e-3, atol=1e-3)
    with pytest.raises(ValueError, match="outside the engine's profile"):
        engine.run(np.zeros((5, 3, 32, 32), np.float32))


@pytest.mark.tensorrt
@pytest.mark.gpu
def test_fp16_engine_is_close(gpu_sm, tmp_path):
    onnx_path = _export_conv(tmp_path / "conv.onnx")
    built = build_engine(onnx_path, tmp_path, input_name="images", chw=(3, 32, 32), batch_max=2, fp16=True, workspace_gb=1)
    assert built.path.name.endswith(".fp16.engine")
    batch = np.random.default_rng(1).standard_normal((2, 3, 32, 32), dtype=np.float32)
    (got,) = TensorRTEngine(built.path).run(batch)
    assert got.dtype == np.float32
    np.testing.assert_allclose(got, _onnxruntime(onnx_path, batch)[0], rtol=2e-2, atol=2e-2)


@pytest.mark.tensorrt
@pytest.mark.gpu
def test_data_dependent_output_shape(gpu_sm, tmp_path):
    # Like Faster R-CNN's box count: the output size is only known after the run.
    import torch

    class Positives(torch.nn.Module):
        def forward(self, x):
            return torch.nonzero(x > 0.5)

    onnx_path = tmp_path / "nonzero.onnx"
    torch.onnx.export(
        Positives(),
        (torch.randn(1, 1, 8, 8),),
        str(onnx_path),
        input_names=["images"],
        output_names=["idx"],
        dynamic_axes={"images": {0: "batch"}},
        opset_version=17,
        dynamo=False,
    )
    built = build_engine(onnx_path, tmp_path, input_name="images", chw=(1, 8, 8), batch_max=2, fp16=False, workspace_gb=1)
    engine = TensorRTEngine(built.path)
    rng = np.random.default_rng(2)
    for _ in range(2):
        batch = rng.random((2, 1, 8, 8), dtype=np.float32)
        (got,) = engine.run(batch)
        np.testing.assert_array_equal(got, np.argwhere(batch > 0.5))
    (none,) = engine.run(np.zeros((1, 1, 8, 8), np.float32))
    assert none.shape == (0, 4)


@pytest.mark.tensorrt
@pytest.mark.gpu
def test_renamed_engine_for_another_gpu_is_refused(gpu_sm, tmp_path):
    built = build_engine(_export_conv(tmp_path / "conv.onnx"), tmp_path, input_name="images", chw=(3, 32, 32), fp16=False)
    other = "sm_70" if gpu_sm != "sm_70" else "sm_75"
    moved = built.path.with_name(built.path.name.replace(gpu_sm, other))
    built.path.rename(moved)
    with pytest.raises(EngineMismatch, match=f"built for {other}"):
        TensorRTEngine(moved)
    with pytest.raises(GpuMismatch):
        build_engine(tmp_path / "conv.onnx", tmp_path, input_name="images", chw=(3, 32, 32), expected_sm=other)


# -- onnxruntime's TensorRT execution provider (the settings; running it needs a GPU) ---------


def test_onnxruntime_tensorrt_provider_settings_cover_rect_letterboxes(tmp_path):
    from detserve.runtime.engines.onnx import providers_for, wants_tensorrt_ep

    manifest = _onnx_manifest(input=InputSpec(resize="letterbox", imgsz=320, rect=True), precision="fp16", pod="gpu-t4")
    trt, cuda, cpu = providers_for("cuda:0", manifest, tmp_path, trt=True)
    assert trt[0] == "TensorrtExecutionProvider" and cuda[0] == "CUDAExecutionProvider" and cpu == "CPUExecutionProvider"
    options = trt[1]
    assert options["trt_fp16_enable"] and options["trt_engine_cache_enable"] and options["trt_timing_cache_enable"]
    # rect letterbox: one side imgsz, the other any stride multiple, so H and W range from the stride up.
    assert options["trt_profile_min_shapes"] == "images:1x3x32x32"
    assert options["trt_profile_opt_shapes"] == "images:8x3x320x320"
    assert options["trt_profile_max_shapes"] == "images:16x3x320x320"
    assert (tmp_path / "trt-cache").is_dir()
    assert providers_for("cpu", manifest, tmp_path) == ["CPUExecutionProvider"]
    # Never on CPU; on GPU only for pods TensorRT supports, and only when the provider is installed (it is not here).
    assert not wants_tensorrt_ep(manifest, "cpu")
    assert not wants_tensorrt_ep(manifest, "cuda:0")
    assert not wants_tensorrt_ep(_onnx_manifest(pod="gpu-v100"), "cuda:0")
