"""One engine interface over onnxruntime, TensorRT and PyTorch.

An engine takes the artifact's inputs (numpy: the NCHW float image tensor, then
any further inputs, e.g. Faster R-CNN's image sizes) and returns its outputs as
a list of numpy arrays, in the order the manifest's output contract
names them. Engines know nothing of images, boxes or labels: that is the
runtime's pre- and post-processing, done once for every engine.

``load_engine(folder)`` picks the engine from the manifest alone. With
``backend="auto"`` it takes the fastest one this machine can run and says which.
"""

from __future__ import annotations

import importlib.util
import logging
from pathlib import Path
from typing import Literal, Protocol

import numpy as np

from detserve.runtime.manifest import Manifest, ManifestError, read_manifest

log = logging.getLogger("detserve")

Backend = Literal["auto", "onnxruntime", "tensorrt", "torch", "compiled"]
BACKENDS = ("auto", "onnxruntime", "tensorrt", "torch", "compiled")


class Engine(Protocol):
    #: what runs the model, e.g. "onnxruntime-cpu", "tensorrt", "torch-cuda"
    name: str
    #: "cpu" or "cuda:0"
    device: str
    #: the largest batch one ``run`` call takes
    max_batch: int

    def run(self, batch: np.ndarray, *extra: np.ndarray) -> list[np.ndarray]:
        """Run the model on the image tensor (and any further inputs the artifact takes); return its outputs."""
        ...


def cuda_available() -> bool:
    if importlib.util.find_spec("torch") is None:
        return False
    import torch

    return torch.cuda.is_available()


def _ort_has_cuda() -> bool:
    import onnxruntime as ort

    return "CUDAExecutionProvider" in ort.get_available_providers() and cuda_available()


def resolve(manifest: Manifest, backend: str = "auto", device: str = "auto") -> tuple[str, str, str]:
    """Decide (backend, device, why) for a manifest on this machine."""
    if backend not in BACKENDS:
        raise ManifestError(f"unknown backend {backend!r}; choose one of {', '.join(BACKENDS)}")
    if device not in ("auto", "cpu") and not device.startswith("cuda"):
        raise ManifestError(f"unknown device {device!r}; use auto, cpu, cuda or cuda:N")
    if device.startswith("cuda") and not cuda_available():
        raise ManifestError(f"device {device!r} was asked for, but no CUDA GPU is visible; use --device cpu")
    if manifest.format == "aoti":  # issue 13: the compiled PyTorch engine, keyed like TensorRT engines
        if backend not in ("auto", "compiled"):
            raise ManifestError(f"{manifest.artifact} is a compiled torch package; only backend 'compiled' runs it")
        target = "cuda:0" if manifest.gpu_arch else "cpu"
        if device not in ("auto", target) and not (target == "cuda:0" and device.startswith("cuda")):
            raise ManifestError(f"{manifest.artifact} was compiled for {manifest.gpu_arch or 'cpu'}; it cannot run on {device}")
        return "compiled", target if device == "auto" else device, "the artifact is a compiled torch package"
    if backend == "compiled":
        raise ManifestError("backend 'compiled' needs a package built on this GPU: `detserve export --format aoti --pod gpu-a100 ...`")
    if manifest.format == "tensorrt":
        if backend not in ("auto", "tensorrt"):
            raise ManifestError(
                f"{manifest.artifact} is a TensorRT engine; only backend 'tensorrt' runs it "
                "(export with --format onnx for onnxruntime or torch)"
            )
        if device == "cpu":
            raise ManifestError("a TensorRT engine runs on a CUDA GPU only; export with --format onnx for CPU")
        return "tensorrt", device if device != "auto" else "cuda:0", "the artifact is a TensorRT engine"
    if backend == "tensorrt":
        raise ManifestError(
            "backend 'tensorrt' needs an engine built for this GPU: "
            "`detserve export --format tensorrt --pod gpu-t4 ...` (or use backend onnxruntime)"
        )
    if backend == "auto":
        backend = "onnxruntime"
    if device == "auto":
        gpu = _ort_has_cuda() if backend == "onnxruntime" else cuda_available()
        device = "cuda:0" if gpu else "cpu"
        why = "a CUDA GPU is visible" if gpu else "no CUDA GPU (or no CUDA-enabled onnxruntime) is visible"
    else:
        why = "asked for"
    return backend, device, why


def load_engine(
    folder: str | Path,
    *,
    backend: str = "auto",
    device: str = "auto",
    threads: int = 1,
    manifest: Manifest | None = None,
) -> Engine:
    """Load the engine for an export folder. ``threads`` sets CPU intra-op threads."""
    folder = Path(folder)
    manifest = manifest or read_manifest(folder)
    backend, device, why = resolve(manifest, backend, device)
    if backend == "onnxruntime":
        from detserve.runtime.engines.onnx import OnnxEngine, wants_tensorrt_ep

        trt = wants_tensorrt_ep(manifest, device)
        engine: Engine = OnnxEngine(folder, manifest, device=device, threads=threads, trt=trt)
    elif backend == "torch":
        from detserve.runtime.engines.torch import TorchEngine

        engine = TorchEngine(folder, manifest, device=device, threads=threads)
    elif backend == "compiled":
        from detserve.runtime.engines.compiled import CompiledEngine
        from detserve.runtime.manifest import verify_artifact

        engine = CompiledEngine(
            verify_artifact(folder, manifest), expected_target=manifest.gpu_arch, expected_torch=manifest.torch_version,
            device=device, max_batch=manifest.batch.max,
        )  # fmt: skip
    else:
        from detserve.runtime.engines.tensorrt import TensorRTEngine
        from detserve.runtime.manifest import verify_artifact

        path = verify_artifact(folder, manifest)
        engine = TensorRTEngine(
            path,
            expected_sm=manifest.gpu_arch or "",
            expected_trt=manifest.tensorrt_version or "",
            device=int(device.split(":")[1]) if ":" in device else 0,
        )
    log.info("detserve: %s on %s for %s (%s)", engine.name, engine.device, manifest.name, why)
    return engine
