"""`detserve export --pod gpu-a100` on a machine without a GPU, and the compiled engine's keying and refusals.

The export must still produce and verify the ONNX artifact, with the square
letterbox a GPU batch needs, its parity measured against Ultralytics' own
predict on the same square input, a plain-torch program (``model.pt2``) for the
pod, and say which GPU-only builds it left for the pod and why.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from detserve.cli import app
from detserve.runtime.engines import compiled as compiled_lookup
from detserve.runtime.engines import load_engine
from detserve.runtime.engines import tensorrt as trt_lookup
from detserve.runtime.engines.compiled import (
    CompiledUnavailable,
    check_compatible,
    package_filename,
    parse_package_filename,
)
from detserve.runtime.engines.tensorrt import EngineMismatch
from detserve.runtime.manifest import ManifestError, read_manifest
from detserve.runtime.pods import export_plan
from tests.conftest import ROOT


@pytest.fixture(scope="module")
def a100_export(tmp_path_factory):
    if torch.cuda.is_available():
        pytest.skip("this test is about a machine without a GPU")
    out = tmp_path_factory.mktemp("gpu") / "yolo-a100"
    result = CliRunner().invoke(
        app, ["export", "--model", "yolo", "--weights", str(ROOT / "models" / "yolo-shapes.pt"), "--pod", "gpu-a100", "--out", str(out)],
        terminal_width=400,
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    return out, result.output


@pytest.mark.slow  # a gpu-a100 export: 6 s
def test_gpu_pod_export_without_a_gpu_verifies_the_square_onnx(a100_export):
    out, _ = a100_export
    m = read_manifest(out)
    assert (m.format, m.pod, m.input.rect, m.input.imgsz) == ("onnx", "gpu-a100", False, 320)
    assert m.parity is not None and m.parity.passed and m.parity.source_boxes > 0 and m.parity.matched_share >= 0.99
    # The ONNX graph takes any image as the same square: differently sized images share one engine call.
    from detserve.runtime.detector import Detector, engine_calls
    from detserve.runtime.preprocess import pack_inputs

    detector = Detector(out, backend="onnxruntime", device="cpu")
    prepared = [detector.prepare(np.zeros(shape, np.uint8)) for shape in ((480, 640, 3), (1080, 810, 3), (50, 500, 3))]
    assert engine_calls(prepared, detector.engine.max_batch) == [[0, 1, 2]]
    assert pack_inputs(prepared, detector.manifest.input)[0].shape == (3, 3, 320, 320)


def test_gpu_pod_export_reference_is_ultralytics_square_predict(a100_export, scenes):
    """The parity reference letterboxes to the square (Ultralytics' rect=False), not predict's default rect."""
    from detserve.export.parity import compare_all
    from detserve.export.reference import yolo_predict
    from detserve.runtime.detector import Detector
    from detserve.runtime.sources import load_yolo

    out, _ = a100_export
    model = load_yolo(out / "source.pt")
    images = [s.image for s in scenes if s.image.shape[0] != s.image.shape[1]][:3]
    assert images, "needs non-square scenes"
    ours = [Detector(out, backend="onnxruntime", device="cpu").detect([im], conf=0.25)[0] for im in images]
    square = yolo_predict(model, images, imgsz=320, conf=0.25, iou=0.45, rect=False)
    rect = yolo_predict(model, images, imgsz=320, conf=0.25, iou=0.45, rect=True)
    same = compare_all(square, ours)
    assert same.source_boxes > 0 and same.matched == same.source_boxes and same.max_score_diff < 1e-3
    # The rect letterbox is another input: its scores differ from the square's.
    assert any(len(a) != len(b) or not np.allclose(a.scores, b.scores, atol=1e-4) for a, b in zip(square, rect))


def test_gpu_pod_export_says_what_was_left_for_the_pod_and_why(a100_export):
    out, output = a100_export
    m = read_manifest(out)
    pending = {p.step: p for p in m.pending}
    assert set(pending) == {"tensorrt", "aoti"}
    assert "no CUDA GPU" in pending["tensorrt"].reason and "sm_80" in pending["tensorrt"].reason
    assert "--format tensorrt" in pending["tensorrt"].command and "gpu-a100" in pending["tensorrt"].command
    assert "no CUDA GPU" in pending["aoti"].reason and "--format aoti" in pending["aoti"].command
    assert "left for the pod" in output and "tensorrt" in output and "aoti" in output
    assert json.loads((out / "manifest.json").read_text())["pending"][0]["step"] in ("tensorrt", "aoti")


def test_gpu_pod_export_writes_a_plain_torch_program_that_matches_the_source(a100_export):
    out, _ = a100_export
    m = read_manifest(out)
    assert m.program is not None and m.program.max_abs_diff < 1e-3
    from detserve.runtime.manifest import sha256_file
    from detserve.runtime.sources import load_yolo

    assert sha256_file(out / m.program.file) == m.program.sha256
    program = torch.export.load(str(out / m.program.file)).module()
    x = torch.rand(3, 3, 320, 320)  # another batch size than the export example
    with torch.inference_mode():
        got = program(x)
        expected = load_yolo(out / "source.pt").model.fuse().float().eval()(x)[0]
    assert got.shape == expected.shape and float((got - expected).abs().max()) < 1e-2


@pytest.mark.slow  # 4 s
def test_aoti_export_without_a_gpu_refuses_and_keeps_the_onnx(tmp_path):
    from detserve.export.pipeline import ExportError, ExportRequest, export_model

    if torch.cuda.is_available():
        pytest.skip("this test is about a machine without a GPU")
    out = tmp_path / "aoti"
    with pytest.raises(ExportError, match="no CUDA GPU is visible.*inside the pod") as err:
        export_model(ExportRequest(model="yolo", weights=ROOT / "models" / "yolo-shapes.pt", out=out, pod="gpu-t4", format="aoti", quiet=True,
                                   parity_images=[np.full((200, 300, 3), 90, np.uint8)]))  # fmt: skip
    assert "ONNX export" in str(err.value) and read_manifest(out).format == "onnx"


def test_aoti_plan_is_for_gpu_pods_only():
    plan = export_plan("gpu-a100", "aoti", None)
    assert (plan.format, plan.backend, plan.precision, plan.gpu_arch) == ("aoti", "torch-compiled", "fp16", "sm_80")
    with pytest.raises(ValueError, match="GPU pods"):
        export_plan("regular", "aoti", None)


# -- compiled package keying ------------------------------------------------------


def test_package_names_carry_architecture_torch_and_precision():
    name = package_filename("model", "sm_80", "2.11.0+cu130", "fp16")
    assert name == "model.sm_80.torch2.11.fp16.pt2"
    parsed = parse_package_filename(name)
    assert (parsed.target, parsed.torch, parsed.precision) == ("sm_80", "2.11", "fp16")
    assert parse_package_filename("model.cpu.torch2.14.fp32.pt2").target == "cpu"
    for bad in (("model", "80", "2.11", "fp16"), ("model", "sm_80", "x", "fp16"), ("model", "sm_80", "2.11", "int8")):
        with pytest.raises(ValueError):
            package_filename(*bad)
    with pytest.raises(ValueError, match="not a detserve compiled package"):
        parse_package_filename("model.pt2")


def test_a_package_is_never_loaded_on_the_wrong_gpu_or_torch(monkeypatch, tmp_path):
    path = tmp_path / package_filename("model", "sm_80", "2.11.0", "fp16")
    path.write_bytes(b"not loaded: refused first")
    monkeypatch.setattr(trt_lookup, "current_gpu_sm", lambda device=0: None)
    with pytest.raises(CompiledUnavailable, match="none is visible"):
        check_compatible(path, "sm_80", "2.11", "cuda:0")
    monkeypatch.setattr(trt_lookup, "current_gpu_sm", lambda device=0: "sm_75")
    with pytest.raises(EngineMismatch, match="compiled for sm_80.*this device is sm_75.*gpu-t4"):
        check_compatible(path, "sm_80", "2.11", "cuda:0")
    monkeypatch.setattr(trt_lookup, "current_gpu_sm", lambda device=0: "sm_80")
    monkeypatch.setattr(compiled_lookup, "installed_torch_version", lambda: "2.12.0")
    with pytest.raises(EngineMismatch, match="torch 2.11, but torch 2.12.0 is installed"):
        check_compatible(path, "sm_80", "2.11", "cuda:0")
    with pytest.raises(EngineMismatch, match="renamed or the manifest edited"):
        check_compatible(path, "sm_90", "2.11", "cuda:0")
    monkeypatch.setattr(compiled_lookup, "installed_torch_version", lambda: "2.11.0+cu130")
    assert check_compatible(path, "sm_80", "2.11.0", "cuda:0").target == "sm_80"


def test_engines_refuse_to_route_an_aoti_manifest_elsewhere(a100_export):
    out, _ = a100_export
    m = read_manifest(out).model_copy(update={"format": "aoti", "artifact": "model.sm_80.torch2.11.fp16.pt2", "gpu_arch": "sm_80"})
    with pytest.raises(ManifestError, match="only backend 'compiled'"):
        load_engine(out, backend="onnxruntime", manifest=m)
    with pytest.raises(ManifestError, match="cannot run on cpu"):
        load_engine(out, backend="compiled", device="cpu", manifest=m)
    with pytest.raises(ManifestError, match="--format aoti"):
        load_engine(out, backend="compiled", manifest=read_manifest(out))


@pytest.mark.slow
def test_aoti_cpu_package_builds_and_matches_the_source(a100_export, tmp_path):
    """An AOTInductor package for the CPU (about 50 s here): the same build, keying and fp32 parity gate as on a pod."""
    import shutil

    from detserve.export.compiled import build_for_manifest
    from detserve.export.pipeline import ExportRequest

    src, _ = a100_export
    out = tmp_path / "aoti-cpu"
    shutil.copytree(src, out)
    manifest = read_manifest(out)
    req = ExportRequest(model="yolo", weights=None, out=out, pod="gpu-a100", format="aoti", precision="fp32", quiet=True)
    new = build_for_manifest(req, out, manifest, export_plan("gpu-a100", "aoti", "fp32"), device="cpu")
    assert new.format == "aoti" and new.artifact.startswith("model.cpu.torch") and new.gpu_arch is None
    assert new.parity is not None and new.parity.passed and new.parity.source_boxes > 0
    assert "aoti" not in {p.step for p in new.pending}
    engine = load_engine(out)
    assert engine.name == "torch-aoti-cpu"


# -- benchmarks/gpu_check.py: what the GPU machine will run ----------------------------

#: What the GPU machine lacks: the check must not import any of it.
ABSENT_ON_GPU_MACHINE = ("ultralytics", "ray", "dtlpy", "pydantic", "rich", "typer", "onnxruntime")

_RUN_WITHOUT = """
import runpy, sys
for name in sys.argv[1].split(","):
    sys.modules[name] = None  # `import name` now fails, as where it is not installed
# No editable install there either: gpu_check maps the checkout's folders itself.
sys.meta_path[:] = [f for f in sys.meta_path if "editable" not in type(f).__module__]
sys.argv = ["gpu_check.py"] + sys.argv[2:]
runpy.run_path("benchmarks/gpu_check.py", run_name="__main__")
"""


def _gpu_check(*args, env=None):
    import os
    import subprocess
    import sys

    return subprocess.run(
        [sys.executable, "-c", _RUN_WITHOUT, ",".join(ABSENT_ON_GPU_MACHINE), *args],
        cwd=ROOT, capture_output=True, text=True, timeout=600, env={**os.environ, **(env or {})},
    )  # fmt: skip


def test_gpu_check_without_cuda_exits_cleanly_saying_so(tmp_path):
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    result = _gpu_check("--model", str(tmp_path), "--out", str(tmp_path / "out"))
    assert result.returncode == 0, result.stderr
    assert "no CUDA GPU visible" in result.stdout and "nothing was measured" in result.stdout
    assert not (tmp_path / "out").exists()


@pytest.mark.slow  # about 30 s: every section of the GPU script on the CPU; `make test` keeps the no-GPU run above
def test_gpu_check_cpu_smoke_runs_every_section_without_the_missing_packages(a100_export, tmp_path):
    out, _ = a100_export
    result = _gpu_check("--model", str(out), "--out", str(tmp_path / "out"), "--cpu-smoke", env={"OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads((tmp_path / "out" / "gpu_check.json").read_text())
    assert [r["batch"] for r in report["engine_only"]] == [1, 2] and all(r["eager_ips"] > 0 for r in report["engine_only"])
    assert {(r["set"], r["decode"]) for r in report["end_to_end"]} == {
        (s, d) for s in ("640x480", "810x1080") for d in ("cpu-16-threads", "gpu-nvjpeg")
    }
    parity = report["parity"]["fp32"]
    assert parity["matched"] == parity["reference_boxes"]
    assert report["fasterrcnn"] and (tmp_path / "out" / "gpu_check.md").read_text().startswith("# GPU check")
