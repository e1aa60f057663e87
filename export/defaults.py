"""Export the default models (``models/``, trained on generated shapes) into ``artifacts/``, once."""

from __future__ import annotations

from pathlib import Path

from detserve.defaults import DEFAULT_MODELS, is_current, sample_image


def ensure_default_models(names: tuple[str, ...] = ("yolo", "fasterrcnn"), quiet: bool = False) -> dict[str, Path]:
    """Export the default models that are missing or stale; return {app: export folder}."""
    from export.pipeline import ExportRequest, export_model

    folders = {}
    for name in names:
        model = DEFAULT_MODELS[name]
        if not model.weights.is_file():
            raise FileNotFoundError(
                f"default weights {model.weights} are missing; reproduce them with "
                f"`python -m detserve.training {model.family} --out {model.weights}` (see models/README.md)"
            )
        if not is_current(model):
            export_model(
                ExportRequest(
                    model=model.family,  # type: ignore[arg-type]
                    weights=model.weights,
                    arch=model.arch,
                    out=model.folder,
                    name=f"{model.weights.stem}",
                    force=True,
                    quiet=quiet,
                )
            )
        folders[name] = model.folder
    sample_image()  # a scene the default models detect, for curl examples
    return folders
