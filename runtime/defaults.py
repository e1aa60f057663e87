"""The default models: weights the project trains itself on generated shapes (``models/``).

They make ``make serve``, ``detserve predict`` and the tests work offline with
real detections. ``detserve.export.defaults.ensure_default_models`` exports them into
``artifacts/`` once (verified like any export); this module only knows where
they are.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from detserve.runtime.manifest import ManifestError, read_manifest, sha256_file
from detserve.runtime.paths import artifacts_dir, models_dir


@dataclass(frozen=True)
class DefaultModel:
    app: str  # the Serve application name and artifacts/ folder
    family: str
    weights_file: str  # in models/
    arch: str | None = None

    @property
    def weights(self) -> Path:
        return models_dir() / self.weights_file

    @property
    def folder(self) -> Path:
        return artifacts_dir() / self.app


DEFAULT_MODELS = {
    "yolo": DefaultModel("yolo", "yolo", "yolo-shapes.pt"),
    "fasterrcnn": DefaultModel("fasterrcnn", "fasterrcnn", "fasterrcnn-shapes.pth", "fasterrcnn_mobilenet_v3_large_320_fpn"),
}


def is_current(model: DefaultModel) -> bool:
    """True when ``model.folder`` holds a passing export of the current weights."""
    try:
        manifest = read_manifest(model.folder)
    except ManifestError:
        return False
    return (
        manifest.source.sha256 == sha256_file(model.weights)
        and manifest.parity is not None
        and manifest.parity.passed
        and (model.folder / manifest.artifact).is_file()
    )


def default_folder(name: str) -> Path:
    """The export folder of a default model; raises with the fix when it was not exported yet."""
    model = DEFAULT_MODELS[name]
    if not is_current(model):
        raise FileNotFoundError(f"the default {name} model is not exported (or is stale): run `detserve models` (or `make models`)")
    return model.folder


def sample_path() -> Path:
    """Where ``detserve models`` writes a scene the default models detect (curl examples, smoke tests)."""
    return artifacts_dir() / "sample.jpg"
