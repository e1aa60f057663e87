"""What a newcomer sees: every subcommand's --help lists its options, an empty answer says what the
model looks for, `detserve status` without a server says so, the ready banner is correct."""

from __future__ import annotations

import click
import numpy as np
import pytest
from typer.testing import CliRunner

from detserve.cli import app
from tests.conftest import encode, free_port

runner = CliRunner()


def _commands() -> dict[str, click.Command]:
    import typer.main

    return typer.main.get_command(app).commands  # type: ignore[attr-defined]


def test_the_help_test_covers_every_subcommand():
    assert set(_commands()) == {"export", "models", "predict", "info", "status", "evaluate", "serve", "bench"}


@pytest.mark.parametrize("name", sorted(_commands()))  # every subcommand, a new one included
def test_each_subcommands_help_lists_its_options(name):
    result = runner.invoke(app, [name, "--help"], terminal_width=200)
    assert result.exit_code == 0, result.output
    if name == "bench":  # the benchmark runner's own argparse options
        options = ["--quick", "--full", "--setup-peers", "--model", "--only", "--out", "--concurrency", "--peer-workers"]
    else:
        options = [opt for p in _commands()[name].params if p.param_type_name == "option" for opt in p.opts]
        assert options
    for option in options:
        assert option in result.output, (option, result.output)
    assert "<bool>" not in result.output  # a flag takes no value
    assert "<list[" not in result.output.split("Options:")[-1]  # a repeatable option names one value


def test_version_alone_prints_the_version():
    from detserve import __version__

    result = runner.invoke(app, ["--version"])
    assert result.exit_code == 0 and result.output.strip() == f"detserve {__version__}", result.output


def test_flags_are_shown_without_a_type():
    result = runner.invoke(app, ["export", "--help"], terminal_width=200)
    [force] = [line for line in result.output.splitlines() if line.strip().startswith("--force")]
    assert force.split()[1] == "Replace", force


def test_predict_with_nothing_found_says_which_classes_the_model_looks_for(yolo_export, tmp_path):
    blank = tmp_path / "blank.png"
    blank.write_bytes(encode(np.full((96, 128, 3), 127, np.uint8)))
    result = runner.invoke(app, ["predict", str(blank), "--model", str(yolo_export), "--out", str(tmp_path / "out")])
    assert result.exit_code == 0, result.output
    assert "0 boxes" in result.output
    assert "nothing found in blank.png" in result.output
    assert "circle, square, triangle, star" in result.output


def test_info_names_the_classes(yolo_export):
    result = runner.invoke(app, ["info", "--model", str(yolo_export)])
    assert result.exit_code == 0, result.output
    assert "classes (4): circle, square, triangle, star" in result.output


def test_status_without_a_server_says_so_in_one_line():
    port = free_port()  # nobody listens on it
    result = runner.invoke(app, ["status", "--url", f"http://127.0.0.1:{port}"])
    assert result.exit_code == 1
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and "no detserve server answers" in lines[0] and "make serve" in lines[0], result.output


def test_banner_lists_every_app_its_docs_and_the_metrics(tmp_path):
    from detserve.serve.run import banner

    lines = banner(["/yolo", "/fasterrcnn"], "127.0.0.1", 18000, 18001, tmp_path / "sample.jpg")
    text = "\n".join(lines)
    for route in ("/yolo", "/fasterrcnn"):
        assert f"curl -s -X POST 'http://127.0.0.1:18000{route}/predict?conf=0.25'" in text
        assert f"http://127.0.0.1:18000{route}/docs" in text
    assert "http://127.0.0.1:18001/metrics" in text
    assert "DETSERVE_LOG_LEVEL" in text


def test_serve_logs_at_warning_unless_asked(monkeypatch):
    from detserve.serve.run import log_level

    monkeypatch.delenv("DETSERVE_LOG_LEVEL", raising=False)
    assert log_level() == "WARNING"
    monkeypatch.setenv("DETSERVE_LOG_LEVEL", "info")
    assert log_level() == "INFO"


