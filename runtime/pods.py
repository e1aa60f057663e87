"""The Dataloop pods detserve exports for, and what to build for each.

A TensorRT engine only loads on the GPU architecture (compute capability) and
TensorRT version it was built with, so the pod decides the artifact: the table
below says which GPU each pod has and which backend runs best there, and
:func:`export_plan` turns a user's ``--format/--precision`` request into what
is actually built, with the reason when that differs from what was asked.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

PodKind = Literal["cpu", "gpu"]
Backend = Literal["onnxruntime-cpu", "onnxruntime-cuda", "tensorrt", "torch-compiled"]
# "aoti": the compiled PyTorch engine (AOTInductor package), for GPUs without TensorRT
Format = Literal["onnx", "tensorrt", "aoti"]
Precision = Literal["fp32", "fp16"]

FORMATS: tuple[Format, ...] = ("onnx", "tensorrt", "aoti")
PRECISIONS: tuple[str, ...] = ("fp32", "fp16", "int8")

#: The TensorRT release the `gpu` extra pins (pyproject.toml); engines built by
#: another version do not load, so messages name it.
TENSORRT_PIN = "tensorrt-cu13==10.14.1.48.post1"


@dataclass(frozen=True)
class Pod:
    name: str
    kind: PodKind
    gpu: str | None  # "T4"; None on CPU pods
    sm: str | None  # compute capability as "sm_75"; None on CPU pods
    tensorrt_supported: bool  # can the pinned TensorRT build and run engines here
    backend: Backend  # the preferred backend on this pod
    precision: Precision  # the preferred precision on this pod
    opt_batch: int  # the batch the server aims for (TensorRT profile "opt")
    max_batch: int  # the largest batch one engine call takes (profile "max")
    dataloop_pod_type: str  # Dataloop's instance type for the service
    note: str = ""


PODS: dict[str, Pod] = {
    "regular": Pod(
        name="regular",
        kind="cpu",
        gpu=None,
        sm=None,
        tensorrt_supported=False,
        backend="onnxruntime-cpu",
        precision="fp32",
        # On CPU a bigger batch does not lower the cost per image (NOTES.md), so
        # aim for 1; max 8 only lets the server hand over what it has queued.
        opt_batch=1,
        max_batch=8,
        dataloop_pod_type="regular-m",
        note="CPU pod (regular-xs/s/m/l also work): ONNX on onnxruntime's CPU provider, fp32.",
    ),
    "gpu-t4": Pod(
        name="gpu-t4",
        kind="gpu",
        gpu="T4",
        sm="sm_75",
        tensorrt_supported=True,
        backend="tensorrt",
        # T4 does ~8 TFLOPS fp32 but ~65 with fp16 tensor cores.
        precision="fp16",
        opt_batch=8,
        max_batch=16,  # 16 GB; YOLO at 640 x 16 fits with room for the workspace
        dataloop_pod_type="gpu-t4",
        note="Turing T4 (sm_75, 16 GB): TensorRT fp16. Build the engine on a T4 (in the pod).",
    ),
    "gpu-v100": Pod(
        name="gpu-v100",
        kind="gpu",
        gpu="V100",
        sm="sm_70",
        # TensorRT >= 10.5 removed Volta (sm_70) and CUDA 13 cannot target it;
        # the pinned TensorRT is 10.14 for CUDA 13, so no engine can be built.
        tensorrt_supported=False,
        backend="onnxruntime-cuda",
        precision="fp16",  # V100 has fp16 tensor cores (~125 TFLOPS vs ~15 fp32)
        opt_batch=8,
        max_batch=16,
        dataloop_pod_type="gpu-v100",
        note=(
            "Volta V100 (sm_70, 16 GB): TensorRT >= 10.5 and CUDA 13 dropped Volta, so "
            "ONNX on onnxruntime's CUDA provider in fp16 instead. That needs an "
            "onnxruntime-gpu built for CUDA 12 (CUDA 13 builds carry no sm_70 kernels)."
        ),
    ),
    "gpu-a100": Pod(
        name="gpu-a100",
        kind="gpu",
        gpu="A100",
        sm="sm_80",
        tensorrt_supported=True,
        backend="tensorrt",
        precision="fp16",
        opt_batch=16,
        max_batch=32,  # 40/80 GB: memory is not the limit, latency per batch is
        dataloop_pod_type="gpu-a100",
        note="Ampere A100 (sm_80): TensorRT fp16. Build the engine on an A100 (in the pod).",
    ),
}


@dataclass(frozen=True)
class ExportPlan:
    """What ``detserve export`` builds for a pod, and why if it is not what was asked."""

    pod: Pod
    format: Format
    backend: Backend
    precision: Precision
    gpu_arch: str | None  # the sm a TensorRT engine must be built on; None for ONNX
    opt_batch: int
    max_batch: int
    reason: str = ""  # empty when the request was taken as it was
    # --precision int8: the exact artifact is built at ``precision`` (the pod's), and int8 variants
    # beside it from one calibration (export/quantize.py); on TensorRT pods an int8 engine too.
    int8: bool = False

    @property
    def changed(self) -> bool:
        return bool(self.reason)


def get_pod(name: str) -> Pod:
    try:
        return PODS[name]
    except KeyError:
        raise ValueError(f"unknown pod {name!r}; choose one of: {', '.join(PODS)}") from None


def pods_for_sm(sm: str) -> list[str]:
    """The pod names whose GPU has this architecture (for "build it there" messages)."""
    return [pod.name for pod in PODS.values() if pod.sm == sm]


def sm_from_capability(capability: tuple[int, int]) -> str:
    """``(7, 5)`` (``torch.cuda.get_device_capability()``) -> ``"sm_75"``."""
    major, minor = capability
    if not (isinstance(major, int) and isinstance(minor, int)) or major < 1 or not 0 <= minor <= 9:
        raise ValueError(f"not a CUDA compute capability: {capability!r}")
    return f"sm_{major}{minor}"


def export_plan(pod_name: str, requested_format: str | None = None, requested_precision: str | None = None) -> ExportPlan:
    """Decide what to build for ``pod_name``; ``None`` means "the pod's preference".

    Raises ValueError for requests that cannot be met at all (a TensorRT
    engine for a CPU pod), and falls back with a ``reason`` where a working
    alternative exists (TensorRT on Volta -> onnxruntime-cuda fp16), so that
    the user learns it at export time rather than when the pod fails to load.
    """
    pod = get_pod(pod_name)
    if requested_format is not None and requested_format not in FORMATS:
        raise ValueError(f"unknown format {requested_format!r}; choose one of: {', '.join(FORMATS)}")
    if requested_precision is not None and requested_precision not in PRECISIONS:
        raise ValueError(f"unknown precision {requested_precision!r}; choose one of: {', '.join(PRECISIONS)}")
    int8 = requested_precision == "int8"
    if int8:
        requested_precision = None  # the exact artifact: the pod's own precision
    precision: Precision = requested_precision or pod.precision  # type: ignore[assignment]

    def plan(fmt: Format, backend: Backend, precision: Precision, reason: str = "") -> ExportPlan:
        return ExportPlan(
            pod=pod,
            format=fmt,
            backend=backend,
            precision=precision,
            gpu_arch=pod.sm if fmt in ("tensorrt", "aoti") else None,
            opt_batch=pod.opt_batch,
            max_batch=pod.max_batch,
            reason=reason,
            int8=int8,
        )

    if requested_format == "aoti":
        if pod.kind == "cpu":
            raise ValueError(
                f"the compiled engine (--format aoti) is for GPU pods, and pod {pod.name!r} is a CPU pod; "
                f"use `--format onnx --pod {pod.name}`"
            )
        return plan("aoti", "torch-compiled", precision)
    if pod.kind == "cpu":
        if requested_format == "tensorrt":
            gpu_pods = ", ".join(p.name for p in PODS.values() if p.tensorrt_supported)
            raise ValueError(
                f"TensorRT needs a GPU pod, and pod {pod.name!r} is a CPU pod ({pod.dataloop_pod_type}). "
                f"Use `--format onnx --pod {pod.name}` for CPU serving, or a GPU pod with TensorRT: "
                f"`--format tensorrt --pod {gpu_pods.split(', ')[0]}` (TensorRT pods: {gpu_pods})."
            )
        if precision == "fp16":
            return plan(
                "onnx",
                "onnxruntime-cpu",
                "fp32",
                "fp16 was asked for, but onnxruntime's CPU provider has almost no fp16 kernels "
                "(it inserts casts and runs slower than fp32); building fp32 for the CPU pod.",
            )
        return plan("onnx", "onnxruntime-cpu", precision)

    wants_trt = requested_format == "tensorrt" or (requested_format is None and pod.backend == "tensorrt")
    if wants_trt and not pod.tensorrt_supported:
        # Only Volta today. Default to fp16 there unless fp32 was asked for explicitly.
        return plan(
            "onnx",
            "onnxruntime-cuda",
            precision,
            f"pod {pod.name!r} has a {pod.gpu} ({pod.sm}, Volta): TensorRT >= 10.5 and CUDA 13 no longer "
            f"support Volta, and detserve pins {TENSORRT_PIN}. Building ONNX for onnxruntime's "
            f"CUDA provider ({precision}) instead; the pod needs an onnxruntime-gpu built for CUDA 12.",
        )
    if wants_trt:
        return plan("tensorrt", "tensorrt", precision)
    return plan("onnx", "onnxruntime-cuda", precision)
