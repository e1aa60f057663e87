"""`detserve export --adapter DIR`: a user's adapter's weights on detserve's fast path, checked against the adapter itself.

The export is compared with the adapter as written (its prepare_item_func and
predict, offline), box by box, on the same image files; what differs is listed
with its likeliest reason. tests/test_adapter_serving.py serves the export.
"""

from __future__ import annotations

import io
import json

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from detserve.adapters.dataloop_app import PARITY_FILE, accelerated_problem, read_app
from detserve.cli import app as cli
from tests.conftest import encode
from tests.test_adapter_apps import FASTERRCNN, FAULTY, TUTORIAL


@pytest.fixture(scope="module")
def fasterrcnn_exported(tmp_path_factory):
    """`detserve export --adapter` on the Faster R-CNN adapter folder: (export folder, the command's output)."""
    out = tmp_path_factory.mktemp("frcnn") / "export"
    result = CliRunner().invoke(cli, ["export", "--adapter", str(FASTERRCNN), "--out", str(out)], terminal_width=400)
    assert result.exit_code == 0, result.output
    return out, result.output


def test_export_adapter_exports_checks_against_the_adapter_and_records_the_figures(fasterrcnn_exported):
    out, output = fasterrcnn_exported
    assert "serving with conf 0.5, iou 0.5, max_det 100 (conf: configuration conf_threshold" in output
    assert "adapter parity: " in output and "serve it with: detserve serve --adapter" in output
    figures = json.loads((out / PARITY_FILE).read_text())
    assert figures["passed"] and figures["matched_share"] >= 0.99 and figures["adapter_boxes"] > 0 and figures["images"] == 8, figures
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["name"] == "fasterrcnn-shapes" and manifest["defaults"] == {"conf": 0.5, "iou": 0.5, "max_det": 100}
    assert manifest["labels"] == {"1": "circle", "2": "square", "3": "triangle", "4": "star"}  # its id_to_label_map
    assert manifest["parity"]["passed"]  # the export's own check against torchvision, too
    assert accelerated_problem(out) is None


def test_the_tutorial_adapters_export_serves_with_ultralytics_own_thresholds(tutorial_export):
    figures = json.loads((tutorial_export / PARITY_FILE).read_text())
    assert figures["thresholds"]["from"]["iou"] == "Ultralytics predict default" and figures["thresholds"]["iou"] == 0.7
    assert figures["passed"] and figures["max_box_diff_px"] < 0.05, figures
    assert json.loads((tutorial_export / "manifest.json").read_text())["defaults"] == {"conf": 0.25, "iou": 0.7, "max_det": 300}


def _rotated_jpeg(image: np.ndarray) -> bytes:
    """The image stored turned a quarter, with EXIF orientation 6 saying how to turn it back upright."""
    buffer = io.BytesIO()
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.fromarray(np.ascontiguousarray(np.rot90(image, 1))).save(buffer, format="JPEG", quality=95, exif=exif)
    return buffer.getvalue()


def test_boxes_that_differ_are_listed_with_why(fasterrcnn_exported, scenes, no_network):
    """A photo stored turned, with EXIF orientation 6: detserve turns it upright, this adapter's Pillow call does not."""
    from detserve.adapters.accelerate import adapter_parity

    app = read_app(FASTERRCNN)
    parity = adapter_parity(app, app.model(), fasterrcnn_exported[0], [encode(scenes[7].image), _rotated_jpeg(scenes[7].image)])
    assert not parity.passed and parity.matched_share < 0.99
    assert {d.image for d in parity.differences} == {1}  # the plain PNG matched box for box
    assert all("EXIF orientation 6" in d.reason for d in parity.differences), parity.differences
    assert {d.side for d in parity.differences} == {"adapter", "export"}


def test_an_adapter_that_applies_exif_itself_matches_on_a_turned_photo(tutorial_export, scenes, no_network):
    """Ultralytics applies EXIF orientation to a PIL image itself: the tutorial adapter and the export agree."""
    from detserve.adapters.accelerate import adapter_parity

    app = read_app(TUTORIAL)
    parity = adapter_parity(app, app.model(), tutorial_export, [_rotated_jpeg(scenes[7].image)])
    assert parity.passed and parity.adapter_boxes > 0, parity


def test_serving_a_failed_export_is_refused_with_why(tmp_path, tutorial_export):
    import shutil

    out = tmp_path / "failed"
    shutil.copytree(tutorial_export, out)
    figures = json.loads((out / PARITY_FILE).read_text())
    (out / PARITY_FILE).write_text(json.dumps({**figures, "passed": False, "matched_share": 0.5}))
    assert "gives the adapter's boxes for 50.0% of them" in accelerated_problem(out)
    assert "run `detserve export --adapter` first" in accelerated_problem(tmp_path / "nothing")


def test_weights_that_detserve_cannot_export_are_refused_in_one_line(tmp_path):
    from detserve.adapters.user_adapter import AdapterError

    weights = tmp_path / "weights.bin"
    weights.write_bytes(b"not a checkpoint")
    result = CliRunner().invoke(cli, ["export", "--adapter", str(FAULTY), "--model", "faulty", "--weights", str(weights), "--out", str(tmp_path / "x")], terminal_width=400)
    assert result.exit_code == 2 and "neither an Ultralytics YOLO checkpoint nor a torchvision Faster R-CNN state_dict" in result.output, result.output
    no_weights = CliRunner().invoke(cli, ["export", "--adapter", str(FAULTY), "--model", "faulty", "--out", str(tmp_path / "y")], terminal_width=400)
    assert no_weights.exit_code == 2 and "has no weights_filename" in no_weights.output, no_weights.output
    assert issubclass(AdapterError, RuntimeError)
