"""TensorRT names, versions and environment lookups, shared by the builder and the runtime.

An engine only loads on the GPU architecture (sm) and the TensorRT version it
was built with, so both go into the engine's file name and the timing cache's.
This module holds what both sides need to agree on that: the file-name scheme,
version comparison, the errors, and the lookups of what this machine has
(installed TensorRT, the GPU's sm). The runtime (``detserve.engines.tensorrt``)
loads engines with it; the export stage (``export.tensorrt``) builds them with
it. ``detserve`` never imports ``export``: data flows from export to runtime.

TensorRT and CUDA are only touched inside the lookup functions, so this module
imports anywhere. Callers look the lookups up through this module
(``from detserve import trt as trt_lookup; trt_lookup.current_gpu_sm()``), so a
single ``monkeypatch.setattr(detserve.trt, "current_gpu_sm", ...)`` reaches the
builder and the engine alike.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from detserve.pods import TENSORRT_PIN, pods_for_sm, sm_from_capability

PRECISIONS = ("fp32", "fp16")

#: What to run to get TensorRT; quoted by every "TensorRT is not installed" message.
INSTALL_HINT = (
    f"Install it with `pip install 'detserve[gpu]'` (pins {TENSORRT_PIN}) on a machine that reaches "
    "NVIDIA's package index (pypi.nvidia.com): the registry's tensorrt packages only download the real "
    "wheels from there."
)


class TensorRTUnavailable(RuntimeError):
    """TensorRT, or a CUDA GPU for it, is not there; the message says what to do."""


class TensorRTBuildError(RuntimeError):
    """The ONNX model did not parse or the builder failed."""


class GpuMismatch(TensorRTBuildError):
    """This GPU is not the architecture the engine is meant for."""


@dataclass(frozen=True)
class EngineName:
    stem: str
    sm: str
    trt: str  # "10.14": engines do not move across TensorRT versions
    precision: str


# -- names and versions (pure) -----------------------------------------------


def trt_major_minor(version: str) -> str:
    """``"10.14.1.48.post1"`` -> ``"10.14"``."""
    match = re.match(r"^(\d+)\.(\d+)", version.strip())
    if not match:
        raise ValueError(f"not a TensorRT version: {version!r}")
    return f"{match[1]}.{match[2]}"


def _numeric_parts(version: str) -> list[str]:
    match = re.match(r"^\d+(?:\.\d+)*", version.strip())
    if not match:
        raise ValueError(f"not a TensorRT version: {version!r}")
    return match[0].split(".")


def trt_version_matches(built: str, installed: str) -> bool:
    """Compare as many numeric parts as ``built`` names: "10.14" (the file name) or "10.14.1.48"."""
    want = _numeric_parts(built)[:4]
    return _numeric_parts(installed)[: len(want)] == want


def _check_sm(sm: str) -> None:
    if not re.fullmatch(r"sm_\d{2,3}", sm):
        raise ValueError(f"not a GPU architecture: {sm!r} (expected e.g. 'sm_75')")


def engine_filename(stem: str, sm: str, trt_version: str, precision: str) -> str:
    """``model.sm_75.trt10.14.fp16.engine``: everything the engine is tied to, in its name."""
    _check_sm(sm)
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    if not stem or "/" in stem:
        raise ValueError(f"bad engine stem {stem!r}")
    return f"{stem}.{sm}.trt{trt_major_minor(trt_version)}.{precision}.engine"


_ENGINE_NAME = re.compile(r"^(?P<stem>.+)\.(?P<sm>sm_\d{2,3})\.trt(?P<trt>\d+\.\d+)\.(?P<precision>fp32|fp16)\.engine$")


def parse_engine_filename(name: str | Path) -> EngineName:
    match = _ENGINE_NAME.match(Path(name).name)
    if not match:
        raise ValueError(
            f"{Path(name).name!r} is not a detserve engine name "
            "(<stem>.<sm_XX>.trt<major.minor>.<fp32|fp16>.engine, e.g. yolo11n.sm_75.trt10.14.fp16.engine)"
        )
    return EngineName(**match.groupdict())


def timing_cache_filename(sm: str, trt_version: str) -> str:
    """Timing caches, like engines, hold per-GPU, per-version measurements."""
    _check_sm(sm)
    return f"timing.{sm}.trt{trt_major_minor(trt_version)}.cache"


# -- environment lookups (module-level so tests can replace them) ------------


def installed_tensorrt_version() -> str | None:
    try:
        import tensorrt as trt
    except ImportError:
        return None
    return str(trt.__version__)


def current_gpu_sm(device: int = 0) -> str | None:
    """The sm of CUDA device ``device``, or None without a usable CUDA GPU."""
    try:
        import torch
    except ImportError:
        return None
    if not torch.cuda.is_available() or device >= torch.cuda.device_count():
        return None
    return sm_from_capability(torch.cuda.get_device_capability(device))


def gpu_name(device: int = 0) -> str:
    try:
        import torch

        return torch.cuda.get_device_name(device)
    except Exception:  # only used in messages
        return "this GPU"


def import_tensorrt():
    try:
        import tensorrt as trt
    except ImportError as exc:
        raise TensorRTUnavailable(
            f"TensorRT is not installed ({exc}). {INSTALL_HINT} Meanwhile the "
            "exported ONNX model serves with onnxruntime (`--format onnx`, backend onnxruntime)."
        ) from None
    return trt


def require_gpu(expected_sm: str | None, device: int = 0) -> str:
    """The sm of the GPU that will build; refuses when it is not the target pod's."""
    sm = current_gpu_sm(device)
    if sm is None:
        raise TensorRTUnavailable(
            "building a TensorRT engine needs a CUDA GPU, and none is visible "
            "(torch.cuda.is_available() is False). Build inside the target GPU pod, "
            "or export --format onnx here."
        )
    if expected_sm and sm != expected_sm:
        pods = pods_for_sm(expected_sm)
        where = f"inside the {' or '.join(pods)} pod" if pods else "there"
        raise GpuMismatch(
            f"this machine's GPU ({gpu_name(device)}) is {sm}, but the engine is for {expected_sm}"
            f"{' (' + ', '.join(pods) + ')' if pods else ''}: an engine built here would not load there. "
            f"Build on a {expected_sm} GPU: run the export {where}, or on a machine with the same GPU type."
        )
    return sm
