"""The compiled PyTorch engine, for GPUs without TensorRT: an AOTInductor package built on the target.

An AOTInductor package (``torch._inductor.aoti_compile_and_package``) holds
kernels generated for one GPU architecture by one torch version, so it is keyed
exactly like a TensorRT engine: both are in its file name
(``model.sm_80.torch2.11.fp16.pt2``) and in the manifest (``gpu_arch``,
``torch_version``), and :func:`check_compatible` refuses a package on any other
GPU or torch before loading it (a mismatched package fails in native code, or
runs kernels tuned for another chip). A package built for the CPU is named
``cpu`` instead of an sm; the slow test builds one of those to check parity
where no GPU is at hand.

What runs on the pod: fp16 weights, channels-last input, and one CUDA graph per
batch bucket (``runtime.device.DevicePath(cuda_graphs=True)`` around
:attr:`CompiledEngine.module`).

Everything here except :class:`CompiledEngine` is plain Python and imports
anywhere; the GPU lookups are the TensorRT module's (one place to replace them).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from detserve.runtime.engines import tensorrt as gpu_lookup
from detserve.runtime.engines.tensorrt import EngineMismatch
from detserve.runtime.pods import pods_for_sm

__all__ = ["CompiledEngine", "CompiledUnavailable", "PackageName", "check_compatible", "package_filename", "parse_package_filename"]

PRECISIONS = ("fp32", "fp16")


class CompiledUnavailable(RuntimeError):
    """The compiled engine cannot run here (no CUDA GPU, or no torch); the message says what to do."""


@dataclass(frozen=True)
class PackageName:
    stem: str
    target: str  # "sm_80", or "cpu"
    torch: str  # "2.11": packages do not move across torch versions
    precision: str


def torch_major_minor(version: str) -> str:
    """``"2.11.0+cu130"`` -> ``"2.11"``."""
    match = re.match(r"^(\d+)\.(\d+)", version.strip())
    if not match:
        raise ValueError(f"not a torch version: {version!r}")
    return f"{match[1]}.{match[2]}"


def _check_target(target: str) -> None:
    if target != "cpu" and not re.fullmatch(r"sm_\d{2,3}", target):
        raise ValueError(f"not a package target: {target!r} (expected a GPU architecture such as 'sm_80', or 'cpu')")


def package_filename(stem: str, target: str, torch_version: str, precision: str) -> str:
    """``model.sm_80.torch2.11.fp16.pt2``: everything the package is tied to, in its name."""
    _check_target(target)
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    if not stem or "/" in stem:
        raise ValueError(f"bad package stem {stem!r}")
    return f"{stem}.{target}.torch{torch_major_minor(torch_version)}.{precision}.pt2"


_PACKAGE_NAME = re.compile(r"^(?P<stem>.+)\.(?P<target>sm_\d{2,3}|cpu)\.torch(?P<torch>\d+\.\d+)\.(?P<precision>fp32|fp16)\.pt2$")


def parse_package_filename(name: str | Path) -> PackageName:
    match = _PACKAGE_NAME.match(Path(name).name)
    if not match:
        raise ValueError(
            f"{Path(name).name!r} is not a detserve compiled package name "
            "(<stem>.<sm_XX|cpu>.torch<major.minor>.<fp32|fp16>.pt2, e.g. model.sm_80.torch2.11.fp16.pt2)"
        )
    return PackageName(**match.groupdict())


def installed_torch_version() -> str | None:
    try:
        import torch
    except ImportError:
        return None
    return str(torch.__version__)


def current_target(device: str) -> str | None:
    """``"cpu"`` for the CPU, the GPU's sm for ``cuda[:N]``, None when that GPU is not there."""
    if device == "cpu":
        return "cpu"
    index = int(device.split(":")[1]) if ":" in device else 0
    return gpu_lookup.current_gpu_sm(index)


def check_compatible(path: Path, expected_target: str | None, expected_torch: str | None, device: str) -> PackageName:
    """Refuse a package this machine must not load: another GPU architecture, another torch, no GPU."""
    named = parse_package_filename(path)
    if expected_target and named.target != expected_target:
        raise EngineMismatch(
            f"{Path(path).name} says it is for {named.target}, but its manifest says {expected_target}: "
            "the file was renamed or the manifest edited. Re-export the model."
        )
    if expected_torch and torch_major_minor(expected_torch) != named.torch:
        raise EngineMismatch(f"{Path(path).name} says torch {named.torch}, but its manifest says {expected_torch}. Re-export the model.")
    installed = installed_torch_version()
    if installed is None:
        raise CompiledUnavailable(f"{Path(path).name} is a torch AOTInductor package, and torch is not installed")
    here = current_target(device)
    if here is None:
        raise CompiledUnavailable(
            f"{Path(path).name} is compiled for {named.target} and needs that CUDA GPU; none is visible "
            "(serve the ONNX export with onnxruntime here)"
        )
    if here != named.target:
        pods = pods_for_sm(here) if here != "cpu" else []
        how = f"`detserve export --format aoti --pod {pods[0]}` inside that pod" if pods else "`detserve export --format aoti` on this machine"
        raise EngineMismatch(
            f"{Path(path).name} was compiled for {named.target}, but this device is {here}: AOTInductor packages only "
            f"run on the architecture they were compiled for. Build one here ({how}), or serve the ONNX export."
        )
    if torch_major_minor(installed) != named.torch:
        raise EngineMismatch(
            f"{Path(path).name} was compiled by torch {named.torch}, but torch {installed} is installed: a package only "
            f"loads in the torch that built it. Rebuild it with this torch (`detserve export --format aoti ...`)."
        )
    return named


class CompiledEngine:
    """Runs an AOTInductor package; ``run`` keeps the numpy Engine interface, ``module`` is the device callable."""

    def __init__(self, path: Path, *, expected_target: str | None, expected_torch: str | None, device: str = "cuda:0", max_batch: int = 1):
        named = check_compatible(Path(path), expected_target, expected_torch, device)
        import torch

        self._torch = torch
        self.module = torch._inductor.aoti_load_package(str(path))
        self.device = device
        self.name = f"torch-aoti-{device.split(':')[0]}"
        self.max_batch = max_batch
        self.half = named.precision == "fp16"

    def run(self, batch: np.ndarray, *extra: np.ndarray) -> list[np.ndarray]:
        torch = self._torch
        if extra:
            raise ValueError("the compiled YOLO engine takes one input, the image batch")
        with torch.inference_mode():
            x = torch.from_numpy(np.ascontiguousarray(batch)).to(self.device)
            x = x.half() if self.half else x.float()
            out = self.module(x)
            out = out[0] if isinstance(out, (list, tuple)) else out
            return [out.float().cpu().numpy()]
