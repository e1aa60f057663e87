"""Load source weights into eager PyTorch modules: the reference every artifact is judged by.

Used by ``export`` (to trace and to check parity) and by the PyTorch engine (the
fallback backend). Errors name the file and what to pass instead.
"""

from __future__ import annotations

import zipfile
from dataclasses import dataclass
from pathlib import Path

import torch

FASTERRCNN_ARCHS = (
    "fasterrcnn_resnet50_fpn",
    "fasterrcnn_resnet50_fpn_v2",
    "fasterrcnn_mobilenet_v3_large_fpn",
    "fasterrcnn_mobilenet_v3_large_320_fpn",
)


class SourceError(ValueError):
    """Weights that cannot be loaded as the model family asked for."""


@dataclass
class FasterRCNNCheckpoint:
    arch: str
    state_dict: dict[str, torch.Tensor] | None
    labels: list[str] | None  # without background, in label-id order 1..K
    num_classes: int | None  # including background
    min_size: int | None
    max_size: int | None


def read_fasterrcnn_checkpoint(path: Path | None, arch: str | None) -> FasterRCNNCheckpoint:
    """Read a torchvision state_dict, bare or wrapped as {"state_dict"/"model": ..., "arch", "labels", ...}.

    Loaded with ``weights_only=True``: a checkpoint never runs code.
    """
    if path is None:
        if arch is None:
            raise SourceError("give --arch (one of " + ", ".join(FASTERRCNN_ARCHS) + ") for a random-init model")
        return FasterRCNNCheckpoint(_check_arch(arch), None, None, None, None, None)
    obj = _torch_load(path, weights_only=True)
    if not isinstance(obj, dict):
        raise SourceError(f"{path} holds a {type(obj).__name__}, not a state_dict: save it with torch.save(model.state_dict(), path)")
    meta: dict = {}
    for key in ("state_dict", "model"):
        if key in obj and isinstance(obj[key], dict):
            meta, obj = obj, obj[key]
            break
    if not obj or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise SourceError(f"{path} is not a torchvision state_dict (expected a dict of tensors)")
    if not any(k.startswith("roi_heads.box_predictor") for k in obj):
        raise SourceError(
            f"{path} is not a Faster R-CNN state_dict (no roi_heads.box_predictor weights); "
            "is it a YOLO checkpoint? Use --model yolo for those."
        )
    if arch and meta.get("arch") and arch != meta["arch"]:
        raise SourceError(f"--arch {arch} does not match the checkpoint's arch {meta['arch']}")
    arch = _check_arch(arch or meta.get("arch") or _guess_arch(obj))
    num_classes = int(obj["roi_heads.box_predictor.cls_score.weight"].shape[0])
    state = {k: (v.float() if v.is_floating_point() else v) for k, v in obj.items()}  # fp16-shipped weights
    return FasterRCNNCheckpoint(
        arch, state, meta.get("labels"), num_classes, meta.get("min_size"), meta.get("max_size")
    )


def _guess_arch(state: dict) -> str:
    if "backbone.body.conv1.weight" in state:
        return "fasterrcnn_resnet50_fpn_v2" if "rpn.head.conv.1.0.weight" in state else "fasterrcnn_resnet50_fpn"
    raise SourceError("cannot tell the architecture from the state_dict: pass --arch")


def _check_arch(arch: str) -> str:
    if arch not in FASTERRCNN_ARCHS:
        raise SourceError(f"unknown Faster R-CNN arch {arch!r}; choose one of {', '.join(FASTERRCNN_ARCHS)}")
    return arch


def build_fasterrcnn(
    arch: str, num_classes: int, *, state_dict=None, min_size: int | None = None, max_size: int | None = None, **kwargs
) -> torch.nn.Module:
    """A torchvision Faster R-CNN in eval mode, built offline (no pretrained downloads)."""
    import torchvision.models.detection as tvd

    if min_size is not None:
        kwargs["min_size"] = min_size
    if max_size is not None:
        kwargs["max_size"] = max_size
    model = getattr(tvd, _check_arch(arch))(weights=None, weights_backbone=None, num_classes=num_classes, **kwargs)
    if state_dict is not None:
        expected = model.state_dict()
        missing = [k for k in expected if k not in state_dict]
        unexpected = [k for k in state_dict if k not in expected]
        wrong = [k for k in expected if k in state_dict and state_dict[k].shape != expected[k].shape]
        if missing or unexpected or wrong:
            parts = [f"{len(v)} {what} (e.g. {v[0]})" for what, v in (("missing", missing), ("unexpected", unexpected), ("of another shape", wrong)) if v]
            raise SourceError(
                f"the weights do not fit {arch} with {num_classes} classes: {', '.join(parts)} keys; "
                "check --arch and that the file is a state_dict of that model"
            )
        model.load_state_dict(state_dict)
    return model.eval()


def load_yolo(path: Path):
    """An Ultralytics ``YOLO`` from a checkpoint (.pt) or a model config (.yaml, random init).

    Ultralytics checkpoints are pickled modules, so ``weights_only=True`` cannot
    load them; load only checkpoints you trust (as with Ultralytics itself).
    """
    from ultralytics import YOLO

    path = Path(path)
    if path.suffix in (".yaml", ".yml"):
        try:
            return YOLO(str(path) if path.exists() else path.name)
        except Exception as exc:  # ultralytics raises many kinds for a bad cfg
            raise SourceError(f"cannot build a YOLO model from {path}: {exc}") from None
    if not path.is_file():
        raise SourceError(f"no weights file at {path}")
    if path.suffix != ".pt":
        raise SourceError(f"{path} is not an Ultralytics checkpoint (.pt) or model config (.yaml)")
    obj = _torch_load(path, weights_only=False)
    if not isinstance(obj, dict) or "model" not in obj or not hasattr(obj.get("model") or obj.get("ema"), "yaml"):
        raise SourceError(
            f"{path} is not an Ultralytics checkpoint (no 'model' entry); "
            "is it a torchvision state_dict? Use --model fasterrcnn for those."
        )
    model = YOLO(str(path))
    if getattr(model, "task", "detect") != "detect":
        raise SourceError(f"{path} is a YOLO {model.task} model; detserve serves detection models")
    return model


def _torch_load(path: Path, weights_only: bool):
    if not Path(path).is_file():
        raise SourceError(f"no weights file at {path}")
    try:
        return torch.load(path, map_location="cpu", weights_only=weights_only)
    except (zipfile.BadZipFile, EOFError, RuntimeError, OSError) as exc:
        raise SourceError(f"{path} is not a readable PyTorch checkpoint (corrupt or truncated?): {str(exc).splitlines()[0]}") from None
    except Exception as exc:  # unpickling errors of many kinds
        if weights_only and "ultralytics" in str(exc):
            raise SourceError(f"{path} is an Ultralytics (YOLO) checkpoint, not a torchvision state_dict: use --model yolo") from None
        raise SourceError(f"{path} is not a readable PyTorch checkpoint (corrupt, truncated, or another format): {type(exc).__name__}") from None
