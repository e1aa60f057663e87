"""TensorRT: everything the runtime and the export stage share, and the engine itself.

Who owns what:

- this module (runtime): the engine-file naming scheme (GPU architecture and
  TensorRT version are in the name), version comparison, the lookups of what
  this machine has (installed TensorRT, the GPU's sm), the errors, and
  :class:`TensorRTEngine`, which loads and runs a serialized engine;
- ``detserve.export.tensorrt`` (export): building engines from ONNX and
  checking their parity. It imports this module; this module never imports it.

Device memory is torch CUDA tensors and the work goes on a ``torch.cuda.Stream``
(no pycuda). TensorRT and CUDA are only touched inside the lookup functions
and when an engine is created, so this module imports on machines without
either. The lookups are module-level functions, called through the module at
call time, so a test replaces them in one place
(``monkeypatch.setattr(tensorrt_module, "current_gpu_sm", ...)``) for the
builder and the engine alike.

An engine only loads on the GPU architecture and TensorRT version it was built
with. Deserializing a mismatched engine fails with an opaque log line or, worse,
crashes, so the constructor compares both first and refuses with the fix.
"""

from __future__ import annotations

import re
import threading
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from detserve.runtime.pods import TENSORRT_PIN, pods_for_sm, sm_from_capability

__all__ = ["EngineMismatch", "TensorRTEngine", "TensorRTUnavailable"]

PRECISIONS = ("fp32", "fp16", "int8")

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


_ENGINE_NAME = re.compile(r"^(?P<stem>.+)\.(?P<sm>sm_\d{2,3})\.trt(?P<trt>\d+\.\d+)\.(?P<precision>fp32|fp16|int8)\.engine$")


def parse_engine_filename(name: str | Path) -> EngineName:
    match = _ENGINE_NAME.match(Path(name).name)
    if not match:
        raise ValueError(
            f"{Path(name).name!r} is not a detserve engine name "
            "(<stem>.<sm_XX>.trt<major.minor>.<fp32|fp16|int8>.engine, e.g. yolo11n.sm_75.trt10.14.fp16.engine)"
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

# -- the engine ---------------------------------------------------------------


class EngineMismatch(ValueError):
    """The engine was built for another GPU architecture or TensorRT version."""


def _built_for(path: Path, expected_sm: str | None, expected_trt: str | None) -> tuple[str, str]:
    """(sm, TensorRT version) the engine was built for: explicit values, else its file name."""
    try:
        named = parse_engine_filename(path)
    except ValueError:
        named = None
    if named and expected_sm and named.sm != expected_sm:
        raise EngineMismatch(
            f"{path.name} says it is for {named.sm}, but its manifest says {expected_sm}: "
            "the file was renamed or the manifest edited. Re-export the model."
        )
    sm = expected_sm or (named.sm if named else "")
    trt_version = expected_trt or (named.trt if named else "")
    if not sm or not trt_version:
        raise EngineMismatch(
            f"cannot tell which GPU and TensorRT version {path.name} was built for: pass expected_sm/"
            "expected_trt (the manifest's gpu_arch/tensorrt_version) or keep the name build_engine gave it "
            "(<stem>.<sm_XX>.trt<major.minor>.<precision>.engine)"
        )
    return sm, trt_version


def check_compatible(path: Path, expected_sm: str | None, expected_trt: str | None, device: int = 0) -> tuple[str, str]:
    """Refuse an engine this machine cannot load; returns (sm, installed TensorRT version)."""
    built_sm, built_trt = _built_for(path, expected_sm, expected_trt)
    installed = installed_tensorrt_version()
    if installed is None:
        raise TensorRTUnavailable(
            f"{path.name} is a TensorRT engine, and TensorRT is not installed. Install {TENSORRT_PIN} "
            "(`pip install 'detserve[gpu]'`, from a machine that reaches NVIDIA's package index), "
            "or serve the ONNX export with onnxruntime."
        )
    sm = current_gpu_sm(device)
    if sm is None:
        raise TensorRTUnavailable(f"{path.name} is a TensorRT engine and needs a CUDA GPU; none is visible")
    if sm != built_sm:
        built_pods = ", ".join(pods_for_sm(built_sm)) or "another GPU"
        here = pods_for_sm(sm)
        how = (
            f"`detserve export --format tensorrt --pod {here[0]}` run inside that pod"
            if here
            else "`detserve export --format tensorrt` run on this GPU type"
        )
        raise EngineMismatch(
            f"{path.name} was built for {built_sm} ({built_pods}), but this GPU ({gpu_name(device)}) is {sm}: "
            f"TensorRT engines only load on the GPU architecture they were built on. Build one for this GPU "
            f"({how}), or serve the ONNX export with onnxruntime."
        )
    if not trt_version_matches(built_trt, installed):
        raise EngineMismatch(
            f"{path.name} was built with TensorRT {built_trt}, but TensorRT {installed} is installed: engines "
            f"only load in the TensorRT version that built them. Install {TENSORRT_PIN} (what detserve "
            f"builds with), or rebuild the engine with TensorRT {trt_major_minor(installed)}."
        )
    return sm, installed


def _torch_dtype(trt, torch, dtype):
    table = {
        "FLOAT": torch.float32,
        "HALF": torch.float16,
        "BF16": torch.bfloat16,
        "INT32": torch.int32,
        "INT64": torch.int64,
        "INT8": torch.int8,
        "UINT8": torch.uint8,
        "BOOL": torch.bool,
    }
    for name, torch_dtype in table.items():
        if hasattr(trt.DataType, name) and dtype == getattr(trt.DataType, name):
            return torch_dtype
    raise TypeError(f"TensorRT tensor type {dtype} has no torch equivalent")


def _output_allocator(trt, torch, device):
    """An output allocator for outputs whose shape is only known after the run.

    Faster R-CNN's box count depends on the image: TensorRT reports -1 for it
    until the kernels have run, and asks the application for memory then.
    """

    class OutputAllocator(trt.IOutputAllocator):
        def __init__(self) -> None:
            super().__init__()
            self.buffer: torch.Tensor | None = None
            self.shape: tuple[int, ...] | None = None

        def reallocate_output_async(self, tensor_name, memory, size, alignment, stream):
            size = max(int(size), 1)  # a 0-byte tensor's data_ptr() is 0, which TensorRT reads as failure
            if self.buffer is None or self.buffer.numel() < size:
                self.buffer = torch.empty(size, dtype=torch.uint8, device=device)
            return self.buffer.data_ptr()

        def reallocate_output(self, tensor_name, memory, size, alignment):
            return self.reallocate_output_async(tensor_name, memory, size, alignment, None)

        def notify_shape(self, tensor_name, shape):
            self.shape = tuple(int(d) for d in shape)

    return OutputAllocator()


class TensorRTEngine:
    name = "tensorrt"

    def __init__(
        self,
        engine_path: Path,
        *,
        expected_sm: str | None = None,
        expected_trt: str | None = None,
        device: int = 0,
    ) -> None:
        path = Path(engine_path)
        if not path.is_file():
            raise FileNotFoundError(f"{path} does not exist: build it with `detserve export --format tensorrt`")
        check_compatible(path, expected_sm, expected_trt, device)

        import tensorrt as trt
        import torch

        self._trt, self._torch = trt, torch
        self._cuda = torch.device("cuda", device)
        self.device = f"cuda:{device}"
        self._logger = trt.Logger(trt.Logger.WARNING)
        with torch.cuda.device(self._cuda):
            self._runtime = trt.Runtime(self._logger)
            engine = self._runtime.deserialize_cuda_engine(path.read_bytes())
            if engine is None:
                raise EngineMismatch(
                    f"TensorRT {trt.__version__} could not load {path.name} (see its log above): the file is "
                    f"damaged or was built by another TensorRT build. Rebuild it with {TENSORRT_PIN}."
                )
            self._engine = engine
            self._context = engine.create_execution_context()
            self._stream = torch.cuda.Stream(device=self._cuda)

        names = [engine.get_tensor_name(i) for i in range(engine.num_io_tensors)]
        inputs = [n for n in names if engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
        if not inputs:
            raise ValueError(f"{path.name} has no inputs")
        # The image tensor first; Faster R-CNN adds image_sizes and original_sizes (small int64 tensors).
        self.input_name: str = inputs[0]
        self.extra_input_names: list[str] = inputs[1:]
        self._extra_dtypes = {n: _torch_dtype(trt, torch, engine.get_tensor_dtype(n)) for n in self.extra_input_names}
        self.output_names: list[str] = [n for n in names if engine.get_tensor_mode(n) == trt.TensorIOMode.OUTPUT]
        self._input_dtype = _torch_dtype(trt, torch, engine.get_tensor_dtype(self.input_name))
        self._output_dtypes = {n: _torch_dtype(trt, torch, engine.get_tensor_dtype(n)) for n in self.output_names}
        low, opt, high = (tuple(int(d) for d in s) for s in engine.get_tensor_profile_shape(self.input_name, 0))
        self.profile = {"min": low, "opt": opt, "max": high}
        # An engine built from a CHW ONNX input (no batch axis) takes one image per call;
        # detserve's own exports (YOLO, batched Faster R-CNN) are NCHW.
        self._batched = len(high) == 4
        self.max_batch: int = high[0] if self._batched else 1
        self._buffers: dict = {}  # output name -> flat torch tensor, sized for the profile's max
        self._allocators: dict = {}  # output name -> allocator, for data-dependent outputs
        self._lock = threading.Lock()  # one execution context: one run at a time

    def _check_input(self, batch: np.ndarray) -> tuple[int, ...]:
        if batch.ndim != 4:
            raise ValueError(f"expected an NCHW batch, got shape {batch.shape}")
        shape = tuple(batch.shape) if self._batched else tuple(batch.shape[1:])
        if not self._batched and batch.shape[0] != 1:
            raise ValueError(f"this engine takes one image per call (no batch axis); got a batch of {batch.shape[0]}")
        low, high = self.profile["min"], self.profile["max"]
        if any(not lo <= d <= hi for d, lo, hi in zip(shape, low, high)):
            raise ValueError(
                f"input shape {tuple(batch.shape)} is outside the engine's profile {low}..{high}; "
                "split the batch or rebuild the engine with a larger profile"
            )
        return shape

    def _allocate(self) -> None:
        """Allocate static outputs once, for the profile's largest input; set up allocators for the rest."""
        context, torch = self._context, self._torch
        if not context.set_input_shape(self.input_name, self.profile["max"]):
            raise RuntimeError(f"TensorRT rejected the profile's max shape {self.profile['max']}")
        for name in self.output_names:
            shape = tuple(context.get_tensor_shape(name))
            if any(d < 0 for d in shape):
                allocator = _output_allocator(self._trt, torch, self._cuda)
                context.set_output_allocator(name, allocator)
                self._allocators[name] = allocator
            else:
                numel = max(int(np.prod(shape)), 1)
                self._buffers[name] = torch.empty(numel, dtype=self._output_dtypes[name], device=self._cuda)

    def run(self, batch: np.ndarray, *extra: np.ndarray) -> list[np.ndarray]:
        """float32 NCHW in (then any further inputs, in the engine's order); outputs in the engine's order."""
        if len(extra) != len(self.extra_input_names):
            raise ValueError(f"the engine takes inputs {[self.input_name, *self.extra_input_names]}; got {1 + len(extra)} arrays")
        shape = self._check_input(batch)
        torch, context = self._torch, self._context
        with self._lock, torch.cuda.device(self._cuda), torch.cuda.stream(self._stream):
            if not self._buffers and not self._allocators:
                self._allocate()
            host = torch.from_numpy(np.ascontiguousarray(batch, dtype=np.float32))
            x = host.to(self._cuda).to(self._input_dtype).reshape(shape).contiguous()
            if not context.set_input_shape(self.input_name, shape):
                raise ValueError(f"TensorRT rejected input shape {shape} (profile {self.profile})")
            context.set_tensor_address(self.input_name, x.data_ptr())
            keep = [x]  # device copies of the extra inputs live until the run is done
            for name, array in zip(self.extra_input_names, extra):
                t = torch.from_numpy(np.ascontiguousarray(array)).to(self._cuda).to(self._extra_dtypes[name]).contiguous()
                if not context.set_input_shape(name, tuple(t.shape)):
                    raise ValueError(f"TensorRT rejected the shape {tuple(t.shape)} of input {name!r}")
                context.set_tensor_address(name, t.data_ptr())
                keep.append(t)
            out_shapes = {}
            for name, buffer in self._buffers.items():
                out_shape = tuple(context.get_tensor_shape(name))
                numel = int(np.prod(out_shape))
                if numel > buffer.numel():  # not expected past the max profile shape; grow rather than overrun
                    buffer = self._buffers[name] = torch.empty(numel, dtype=buffer.dtype, device=self._cuda)
                out_shapes[name] = out_shape
                context.set_tensor_address(name, buffer.data_ptr())
            for allocator in self._allocators.values():
                allocator.shape = None  # so a shape left from the last run is never read as this one's
            if not context.execute_async_v3(self._stream.cuda_stream):
                raise RuntimeError("TensorRT execute_async_v3 failed; see the TensorRT log above")
            outputs = []
            for name in self.output_names:
                if name in self._buffers:
                    out_shape = out_shapes[name]
                    tensor = self._buffers[name][: int(np.prod(out_shape))].view(out_shape)
                else:
                    self._stream.synchronize()  # the allocator learns the shape during the run
                    allocator = self._allocators[name]
                    dtype, out_shape = self._output_dtypes[name], allocator.shape
                    if out_shape is None:
                        raise RuntimeError(f"TensorRT did not report the shape of output {name!r}")
                    numel = int(np.prod(out_shape))
                    if numel == 0 or allocator.buffer is None:
                        tensor = torch.empty(out_shape, dtype=dtype, device=self._cuda)
                    else:
                        nbytes = numel * dtype.itemsize
                        tensor = allocator.buffer[:nbytes].view(dtype).view(out_shape)
                if tensor.dtype in (torch.float16, torch.bfloat16):
                    tensor = tensor.float()  # as the onnxruntime engine returns them
                outputs.append(tensor.cpu())  # .cpu() waits for the stream
            self._stream.synchronize()
            # Copies: the device buffers are reused by the next run.
            return [t.numpy() for t in outputs]
