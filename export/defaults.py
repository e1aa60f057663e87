"""Export the default models (``models/``, trained on generated shapes) into ``artifacts/``, once."""

from __future__ import annotations

from pathlib import Path

from detserve.runtime.defaults import DEFAULT_MODELS, is_current, sample_path


def ensure_default_models(names: tuple[str, ...] = ("yolo", "fasterrcnn"), quiet: bool = False) -> dict[str, Path]:
    """Export the default models that are missing or stale; return {app: export folder}."""
    from detserve.export.pipeline import ExportRequest, export_model

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
    write_sample_image()
    return folders


def write_sample_image() -> Path:
    """A generated scene with shapes the default models detect, for curl examples and smoke tests."""
    path = sample_path()
    if not path.is_file():
        from PIL import Image

        from detserve.training.synthetic import scenes

        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(scenes(1, seed=2024)[0].image).save(path, quality=95)
    return path
