"""`detserve predict`: Dataloop JSON and a picture per image; unreadable files reported, the rest still done."""

from __future__ import annotations

import json
from pathlib import Path

import ultralytics
from PIL import Image
from typer.testing import CliRunner

from detserve.cli import app
from tests.conftest import encode

BUS = Path(ultralytics.__file__).parent / "assets" / "bus.jpg"


def test_predict_writes_dataloop_json_and_a_picture(yolo_export, scenes, tmp_path):
    scene = tmp_path / "scene.png"
    scene.write_bytes(encode(scenes[0].image))
    out = tmp_path / "out"
    result = CliRunner().invoke(app, ["predict", str(BUS), str(scene), "--model", str(yolo_export), "--out", str(out), "--conf", "0.3"])
    assert result.exit_code == 0, result.output
    for stem, size in (("bus", (810, 1080)), ("scene", scenes[0].image.shape[1::-1])):
        annotations = json.loads((out / f"{stem}.json").read_text())
        assert isinstance(annotations, list)
        for a in annotations:  # Dataloop box annotation JSON
            assert a["type"] == "box" and a["label"] in {"circle", "square", "triangle", "star"}
            assert len(a["coordinates"]) == 2 and a["metadata"]["user"]["model"]["confidence"] > 0.3
        with Image.open(out / f"{stem}.png") as picture:
            assert picture.size == tuple(size)
    assert len(json.loads((out / "scene.json").read_text())) > 0  # the generated scene has shapes to find


def test_predict_reports_unreadable_files_and_exits_1(yolo_export, scenes, tmp_path):
    good = tmp_path / "good.png"
    good.write_bytes(encode(scenes[1].image))
    bad = tmp_path / "bad.jpg"
    bad.write_bytes(b"not a jpeg")
    out = tmp_path / "out"
    result = CliRunner().invoke(app, ["predict", str(bad), str(good), "--model", str(yolo_export), "--out", str(out)])
    assert result.exit_code == 1
    assert "bad.jpg" in result.output and "Traceback" not in result.output
    assert (out / "good.json").is_file() and not (out / "bad.json").exists()
