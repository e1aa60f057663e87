"""The export stage: artifacts, manifests, parity with the source model, and clear refusals."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import onnx
import pytest
from typer.testing import CliRunner

from detserve.runtime.detector import Detector
from detserve.runtime.manifest import ManifestError, read_manifest, sha256_file
from tests.conftest import ROOT

runner = CliRunner()


def test_yolo_export_records_real_parity(yolo_export):
    m = read_manifest(yolo_export)
    assert m.family == "yolo" and m.format == "onnx"
    assert m.labels == {0: "circle", 1: "square", 2: "triangle", 3: "star"}
    assert m.input.resize == "letterbox" and m.input.imgsz == 320 and m.input.color == "RGB"
    assert m.batch.dynamic and m.batch.min == 1 and m.batch.max >= 8
    assert m.artifact_sha256 == sha256_file(yolo_export / m.artifact)
    assert m.source.sha256 == sha256_file(ROOT / "models" / "yolo-shapes.pt")
    assert {"torch", "onnxruntime", "ultralytics", "onnx"} <= set(m.versions)
    p = m.parity
    assert p is not None and p.passed
    assert p.source_boxes >= 10  # a trained model: parity is tested on real boxes
    assert p.matched_share >= 0.99
    assert p.max_box_diff_px < 0.5 and p.max_score_diff < 1e-3


def test_yolo_graph_has_a_dynamic_batch_and_no_nms(yolo_export):
    graph = onnx.load(str(yolo_export / "model.onnx")).graph
    batch_dim = graph.input[0].type.tensor_type.shape.dim[0]
    assert batch_dim.dim_param and not batch_dim.dim_value
    assert not any(node.op_type == "NonMaxSuppression" for node in graph.node)


def test_one_yolo_graph_gives_each_image_its_own_boxes_at_any_batch(yolo_export, scenes):
    detector = Detector(yolo_export, backend="onnxruntime", device="cpu")
    images = [s.image for s in scenes]
    alone = [detector.detect([im])[0] for im in images]
    for n in (2, 3, 8):
        together = detector.detect(images[:n])
        for a, b in zip(alone, together):
            assert len(a) == len(b)
            np.testing.assert_allclose(a.boxes, b.boxes, atol=1e-3)
            np.testing.assert_array_equal(a.class_ids, b.class_ids)


def test_fasterrcnn_export_records_real_parity(fasterrcnn_export):
    m = read_manifest(fasterrcnn_export)
    assert m.family == "fasterrcnn" and m.arch == "fasterrcnn_mobilenet_v3_large_320_fpn"
    assert m.labels == {1: "circle", 2: "square", 3: "triangle", 4: "star"}  # 0 is background
    assert m.input.resize == "rcnn" and m.input.min_size and m.input.max_size
    assert m.batch.dynamic and m.batch.max >= 8  # one graph for a dynamic batch
    p = m.parity
    assert p is not None and p.passed and p.source_boxes >= 10
    assert p.matched_share >= 0.99 and p.max_box_diff_px < 0.5


def test_engine_refuses_an_artifact_changed_after_export(yolo_export, tmp_path):
    copy = tmp_path / "tampered"
    shutil.copytree(yolo_export, copy)
    with open(copy / "model.onnx", "ab") as f:
        f.write(b"\0")
    with pytest.raises(ManifestError, match="does not match its manifest"):
        Detector(copy, backend="onnxruntime", device="cpu")


def test_random_init_yolo11_config_exports(tmp_path):
    result = runner.invoke(app(), ["export", "--model", "yolo", "--weights", "yolo11n.yaml", "--imgsz", "160", "--out", str(tmp_path / "y11")])
    assert result.exit_code == 0, result.output
    m = read_manifest(tmp_path / "y11")
    assert m.input.imgsz == 160 and m.parity is not None and len(m.labels) == 80


def test_parity_below_threshold_fails_with_a_clear_message(tmp_path, monkeypatch):
    from detserve.export import parity
    from detserve.export.pipeline import ExportError, ExportRequest, export_model

    def nothing_matches(sources, artifacts, iou=0.99):
        result = parity.ParityResult(images=len(sources), source_boxes=10, matched=5)
        return result

    monkeypatch.setattr(parity, "compare_all", nothing_matches)
    with pytest.raises(ExportError, match="parity check failed.*50.0%"):
        export_model(ExportRequest(model="yolo", weights=ROOT / "models" / "yolo-shapes.pt", out=tmp_path / "x", quiet=True))
    m = read_manifest(tmp_path / "x")  # figures kept for the user to look at
    assert m.parity is not None and not m.parity.passed and m.parity.matched_share == 0.5


def app():
    from detserve.cli import app as cli

    return cli


def bad_cases(tmp_path: Path) -> list[tuple[list[str], str]]:
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"this is not a checkpoint")
    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes((ROOT / "models" / "yolo-shapes.pt").read_bytes()[:5000])
    labels3 = tmp_path / "labels3.txt"
    labels3.write_text("a\nb\nc\n")
    exists = tmp_path / "exists"
    exists.mkdir()
    (exists / "keep.txt").write_text("x")
    yolo = str(ROOT / "models" / "yolo-shapes.pt")
    frcnn = str(ROOT / "models" / "fasterrcnn-shapes.pth")
    out = str(tmp_path / "out")
    return [
        (["--model", "yolo", "--weights", str(tmp_path / "missing.pt"), "--out", out], "no weights file"),
        (["--model", "yolo", "--weights", str(garbage), "--out", out], "not a readable PyTorch checkpoint"),
        (["--model", "yolo", "--weights", str(truncated), "--out", out], "not a readable PyTorch checkpoint"),
        (["--model", "yolo", "--weights", frcnn, "--out", out], "not an Ultralytics checkpoint"),
        (["--model", "fasterrcnn", "--weights", yolo, "--out", out], "not a"),
        (["--model", "fasterrcnn", "--arch", "fasterrcnn_tiny", "--out", out, "--labels", str(labels3)], "unknown Faster R-CNN arch"),
        (["--model", "fasterrcnn", "--weights", frcnn, "--labels", str(labels3), "--out", out], "--labels has 3 names"),
        (["--model", "yolo", "--weights", yolo, "--labels", str(labels3), "--out", out], "--labels has 3 names"),
        (["--model", "fasterrcnn", "--weights", frcnn, "--arch", "fasterrcnn_resnet50_fpn", "--out", out], "does not match"),
        (["--model", "yolo", "--weights", yolo, "--out", str(exists)], "already exists"),
        (["--model", "yolo", "--weights", yolo, "--out", str(exists), "--force"], "refusing to delete"),
        (["--model", "ssd", "--weights", yolo, "--out", out], "must be yolo or fasterrcnn"),
        (["--model", "yolo", "--weights", yolo, "--out", out, "--format", "tensorrt", "--pod", "regular"], "GPU"),
        (["--model", "yolo", "--weights", yolo, "--out", out, "--pod", "gpu-h100"], "gpu-t4"),
        (["--model", "yolo", "--weights", yolo, "--out", out, "--imgsz", "300"], "multiple of the model's stride"),
    ]


def test_bad_export_input_gives_one_line_and_exit_2(tmp_path):
    for args, message in bad_cases(tmp_path):
        result = runner.invoke(app(), ["export", *args])
        assert result.exit_code == 2, (args, result.output)
        assert message in result.output, (args, result.output)
        assert "Traceback" not in result.output
        assert result.output.strip().startswith("error:"), result.output
        assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())


@pytest.mark.slow  # 6 s
def test_v100_asks_for_tensorrt_and_gets_the_onnxruntime_fallback(tmp_path):
    out = tmp_path / "v100"
    result = runner.invoke(app(), ["export", "--model", "yolo", "--weights", str(ROOT / "models" / "yolo-shapes.pt"),
                                   "--out", str(out), "--format", "tensorrt", "--pod", "gpu-v100"])  # fmt: skip
    assert result.exit_code == 0, result.output
    assert "Volta" in result.output
    m = read_manifest(out)
    assert m.format == "onnx" and m.pod == "gpu-v100" and m.gpu_arch == "sm_70" and m.precision == "fp16"


def test_manifest_is_json_a_person_can_read(yolo_export):
    data = json.loads((yolo_export / "manifest.json").read_text())
    assert data["parity"]["matched_share"] >= 0.99
    assert data["input"]["resize"] == "letterbox"
