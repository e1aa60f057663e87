"""Shared fixtures: offline environment, default-model exports made once per session."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest

import detserve.runtime.offline

detserve.runtime.offline.apply()

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="session")
def photos() -> list[np.ndarray]:
    from detserve.export.reference import photos as _photos

    return _photos()


@pytest.fixture(scope="session")
def scenes():
    from detserve.training.synthetic import scenes as _scenes

    return _scenes(8, seed=4321)


@pytest.fixture(scope="session")
def yolo_export(tmp_path_factory) -> Path:
    """The default YOLO weights exported once per session (ONNX, parity checked)."""
    from detserve.export.pipeline import ExportRequest, export_model

    out = tmp_path_factory.mktemp("exports") / "yolo"
    export_model(ExportRequest(model="yolo", weights=ROOT / "models" / "yolo-shapes.pt", out=out, quiet=True))
    return out


@pytest.fixture(scope="session")
def fasterrcnn_export(tmp_path_factory) -> Path:
    from detserve.export.pipeline import ExportRequest, export_model

    out = tmp_path_factory.mktemp("exports") / "fasterrcnn"
    export_model(
        ExportRequest(
            model="fasterrcnn",
            weights=ROOT / "models" / "fasterrcnn-shapes.pth",
            out=out,
            quiet=True,
        )
    )
    return out


def encode(image: np.ndarray, fmt: str = "PNG", **kwargs) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format=fmt, **kwargs)
    return buf.getvalue()
