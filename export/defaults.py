"""Export the default models (``models/``, trained on generated shapes) into ``artifacts/``, once."""

from __future__ import annotations

from pathlib import Path

from detserve.runtime.defaults import DEFAULT_MODELS, is_current, sample_path


def ensure_default_models(names: tuple[str, ...] = ("yolo", "fasterrcnn"), quiet: bool = False, int8: bool = False) -> dict[str, Path]:
    """Export the default models that are missing or stale; return {app: export folder}.

    ``int8``: with their int8 variants too (re-exported when they lack them), gated on the held-out
    generated scenes the models' README reports (:func:`int8_gate_sets`).
    """
    from detserve.export.pipeline import ExportRequest, export_model

    folders = {}
    for name in names:
        model = DEFAULT_MODELS[name]
        if not model.weights.is_file():
            raise FileNotFoundError(
                f"default weights {model.weights} are missing; reproduce them with "
                f"`python -m detserve.training {model.family} --out {model.weights}` (see models/README.md)"
            )
        if not is_current(model) or (int8 and not has_int8(model.folder)):
            export_model(
                ExportRequest(
                    model=model.family,  # type: ignore[arg-type]
                    weights=model.weights,
                    arch=model.arch,
                    out=model.folder,
                    name=f"{model.weights.stem}",
                    force=True,
                    quiet=quiet,
                    **(int8_gate_sets() if int8 else {}),
                )
            )
        folders[name] = model.folder
    write_sample_image()
    return folders


def has_int8(folder: Path) -> bool:
    from detserve.runtime.manifest import read_manifest

    return any(v.precision == "int8" and v.gate is not None for v in read_manifest(folder).variants)


def int8_gate_sets() -> dict:
    """ExportRequest fields of a default model's int8 export: gated on mAP over the held-out generated scenes.

    The default models know only generated shapes, so labelled scenes are their
    ``--val``: ``synthetic.scenes(EVAL_N, EVAL_SEED)``, the set models/README.md reports,
    never used in training nor in calibration.
    """
    from detserve.training.datasets import scene_set
    from detserve.training.recipes import EVAL_N, EVAL_SEED

    return {"precision": "int8", "val_images": scene_set(EVAL_N, EVAL_SEED), "val_source": f"generated scenes (seed {EVAL_SEED}, {EVAL_N}: models/README.md's held-out set)"}


def write_sample_image() -> Path:
    """A generated scene with shapes the default models detect, for curl examples and smoke tests."""
    path = sample_path()
    if not path.is_file():
        from PIL import Image

        from detserve.training.synthetic import scenes

        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(scenes(1, seed=2024)[0].image).save(path, quality=95)
    return path
