"""Build a TensorRT engine from an exported ONNX model, for one pod's GPU.

An engine only loads on the GPU architecture (sm) and the TensorRT version it
was built with, so both go into the engine's file name and the timing cache's,
and :func:`build_engine` refuses to build on a GPU other than the target pod's.
:func:`build_for_manifest` is the export pipeline's step: it turns the
parity-checked ONNX export into an engine, checks the engine's parity against
the source model on the GPU (:func:`engine_parity`) and rewrites the manifest.

The names, version checks, errors and machine lookups the runtime needs too
live in :mod:`detserve.runtime.engines.tensorrt` (the runtime must never import ``export``); the
pure ones are re-exported here. The machine lookups (``current_gpu_sm``,
``installed_tensorrt_version``, ``import_tensorrt``, ``gpu_name``,
``require_gpu``) are deliberately *not* re-exported: they are called through
``detserve.runtime.engines.tensorrt`` at call time, so that is the one place to replace them.

TensorRT is imported inside the functions that need it: the helpers here
(shapes, names, version checks) are plain Python and run anywhere.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from detserve.runtime.engines import tensorrt as trt_lookup
from detserve.runtime.engines.tensorrt import EngineMismatch, TensorRTEngine
from detserve.runtime.manifest import BatchSpec, Manifest, ManifestError, Parity, sha256_file, write_manifest
from detserve.runtime.pods import TENSORRT_PIN, ExportPlan
from detserve.runtime.progress import step
from detserve.runtime.engines.tensorrt import (  # noqa: F401  (re-exported: `from detserve.export.tensorrt import engine_filename` keeps working)
    INSTALL_HINT,
    PRECISIONS,
    EngineName,
    GpuMismatch,
    TensorRTBuildError,
    TensorRTUnavailable,
    _check_sm,
    _numeric_parts,
    engine_filename,
    parse_engine_filename,
    timing_cache_filename,
    trt_major_minor,
    trt_version_matches,
)

if TYPE_CHECKING:
    from detserve.runtime.engines import Engine
    from detserve.runtime.postprocess import Detections
    from detserve.export.pipeline import ExportRequest

#: An axis is either fixed (640) or a (min, opt, max) range for a dynamic axis.
Axis = int | tuple[int, int, int]
Shape = tuple[int, ...]


@dataclass(frozen=True)
class BuiltEngine:
    path: Path
    sm: str
    trt_version: str  # the full version that built it, e.g. "10.14.1.48"
    precision: str
    input_name: str
    profile: dict[str, Shape]  # {"min": (1, 3, 640, 640), "opt": ..., "max": ...}
    build_seconds: float
    timing_cache: Path | None = None

    @property
    def max_batch(self) -> int:
        # A CHW input (no batch axis) takes one image per call.
        return self.profile["max"][0] if len(self.profile["max"]) == 4 else 1


# -- pure helpers ------------------------------------------------------------


def _axis_range(name: str, axis: Axis) -> tuple[int, int, int]:
    low, opt, high = (axis, axis, axis) if isinstance(axis, int) else axis
    if not all(isinstance(v, int) and v >= 1 for v in (low, opt, high)):
        raise ValueError(f"{name} must be positive integers, got {axis!r}")
    if not low <= opt <= high:
        raise ValueError(f"{name} must satisfy min <= opt <= max, got min={low}, opt={opt}, max={high}")
    return low, opt, high


def profile_shapes(
    chw: tuple[Axis, Axis, Axis], batch_min: int = 1, batch_opt: int = 1, batch_max: int = 1
) -> dict[str, Shape]:
    """The optimisation profile for an NCHW input.

    ``chw`` is ``(3, 640, 640)`` for a fixed size, or with (min, opt, max)
    triples for dynamic axes: ``(3, (320, 640, 1024), (320, 640, 1024))``.
    """
    if len(chw) != 3:
        raise ValueError(f"chw must be (channels, height, width), got {chw!r}")
    batch = _axis_range("batch (batch_min, batch_opt, batch_max)", (batch_min, batch_opt, batch_max))
    axes = [batch] + [_axis_range(name, axis) for name, axis in zip(("channels", "height", "width"), chw)]
    return {key: tuple(axis[i] for axis in axes) for i, key in enumerate(("min", "opt", "max"))}


def check_profile_against_input(input_name: str, input_shape: Shape, profile: dict[str, Shape]) -> dict[str, Shape]:
    """Fit the profile to the ONNX input's rank and fixed axes (-1 marks a dynamic axis).

    An input without a batch axis (torchvision's Faster R-CNN takes one CHW
    image) drops the profile's batch, which must then be 1. A fixed axis must
    equal the profile on every bound, or the builder fails with an opaque error.
    """
    if len(input_shape) == 3:
        if profile["max"][0] != 1:
            raise ValueError(
                f"input {input_name!r} has no batch axis (shape {tuple(input_shape)}): it takes one image, "
                "so build it with batch_min = batch_opt = batch_max = 1"
            )
        profile = {key: shape[1:] for key, shape in profile.items()}
    if len(input_shape) != len(profile["min"]):
        raise ValueError(f"input {input_name!r} has shape {tuple(input_shape)}; expected NCHW or CHW")
    for i, dim in enumerate(input_shape):
        if dim >= 0 and any(profile[key][i] != dim for key in profile):
            bounds = "/".join(str(profile[key][i]) for key in ("min", "opt", "max"))
            what = "batch" if (i == 0 and len(input_shape) == 4) else f"axis {i}"
            raise ValueError(
                f"input {input_name!r} has a fixed {what} of {dim} (shape {tuple(input_shape)}), but the "
                f"profile asks for {bounds}. Re-export the ONNX with a dynamic {what}, or build with {dim}."
            )
    return profile


# -- the build ---------------------------------------------------------------


def _atomic_write(path: Path, data: bytes) -> None:
    # Two builds sharing a cache folder must never leave a half-written file.
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def build_engine(
    onnx_path: Path,
    out_dir: Path,
    *,
    input_name: str,
    chw: tuple[Axis, Axis, Axis],
    batch_min: int = 1,
    batch_opt: int = 1,
    batch_max: int = 1,
    fp16: bool = True,
    int8: bool = False,
    workspace_gb: float = 4,
    timing_cache: Path | None = None,
    expected_sm: str | None = None,
    device: int = 0,
    progress: Callable[[str], None] | None = None,
) -> BuiltEngine:
    """Parse ``onnx_path``, build an engine for this GPU and write it to ``out_dir``.

    ``timing_cache`` is a file, or a folder that gets ``timing_cache_filename``
    in it; it is read when present and written back after the build, which
    makes rebuilds of the same model on the same GPU much faster.

    ``int8``: ``onnx_path`` is a QDQ graph (``export/quantize.py``'s TensorRT
    encoding) and the engine is built by explicit quantization in a strongly
    typed network: the Q/DQ nodes say what runs in int8, the graph's own
    float types say the rest (fp32 here), and no precision flag is set, as
    TensorRT 10 recommends for Q/DQ networks and TensorRT 11 requires (its
    networks are all strongly typed; it has no STRONGLY_TYPED flag to set).
    """
    say = progress or (lambda message: None)
    onnx_path, out_dir = Path(onnx_path), Path(out_dir)
    # Cheap argument errors first, before importing TensorRT or touching CUDA.
    profile = profile_shapes(chw, batch_min, batch_opt, batch_max)
    if not onnx_path.is_file():
        raise FileNotFoundError(f"{onnx_path} does not exist: export the ONNX model first")
    if expected_sm:
        _check_sm(expected_sm)
    trt = trt_lookup.import_tensorrt()
    sm = trt_lookup.require_gpu(expected_sm, device)
    version = str(trt.__version__)
    precision = "int8" if int8 else "fp16" if fp16 else "fp32"

    import torch

    started = time.perf_counter()
    logger = trt.Logger(trt.Logger.WARNING)
    with torch.cuda.device(device):
        builder = trt.Builder(logger)
        flags = 0  # explicit batch is the only mode in TensorRT 10
        if int8:
            strongly_typed = getattr(trt.NetworkDefinitionCreationFlag, "STRONGLY_TYPED", None)
            if strongly_typed is not None:  # TensorRT 10; 11 types every network strongly and dropped the flag
                flags |= 1 << int(strongly_typed)
        network = builder.create_network(flags)
        parser = trt.OnnxParser(network, logger)
        say(f"parsing {onnx_path.name}")
        # parse_from_file (not parse(bytes)) finds external weight files beside the model.
        if not parser.parse_from_file(str(onnx_path)):
            errors = "\n".join(str(parser.get_error(i)) for i in range(parser.num_errors))
            raise TensorRTBuildError(f"TensorRT {version} could not parse {onnx_path}:\n{errors}")

        inputs = {network.get_input(i).name: tuple(network.get_input(i).shape) for i in range(network.num_inputs)}
        if input_name not in inputs:
            raise ValueError(f"{onnx_path.name} has no input {input_name!r}; its inputs are {sorted(inputs)}")
        if len(inputs) != 1:
            raise ValueError(f"{onnx_path.name} has {len(inputs)} inputs {sorted(inputs)}; detserve builds one-input models")
        fitted = check_profile_against_input(input_name, inputs[input_name], profile)

        config = builder.create_builder_config()
        config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(workspace_gb * (1 << 30)))
        if fp16 and not int8:  # a strongly typed network takes no precision flag
            if not hasattr(trt.BuilderFlag, "FP16"):  # removed in TensorRT 11 (strong typing only)
                raise TensorRTBuildError(
                    f"TensorRT {version} has no BuilderFlag.FP16; detserve targets {TENSORRT_PIN}"
                )
            config.set_flag(trt.BuilderFlag.FP16)
        opt_profile = builder.create_optimization_profile()
        opt_profile.set_shape(input_name, fitted["min"], fitted["opt"], fitted["max"])
        config.add_optimization_profile(opt_profile)

        cache_path = None
        if timing_cache is not None:
            cache_path = Path(timing_cache)
            if cache_path.is_dir():
                cache_path = cache_path / timing_cache_filename(sm, version)
            cached = cache_path.read_bytes() if cache_path.is_file() else b""
            # ignore_mismatch=False: a cache from another GPU or version is
            # rejected rather than trusted; the file name keeps them apart anyway.
            config.set_timing_cache(config.create_timing_cache(cached), ignore_mismatch=False)

        say(f"building {precision} engine for {sm}, batch {batch_min}/{batch_opt}/{batch_max} (takes minutes)")
        serialized = builder.build_serialized_network(network, config)
        if serialized is None:
            raise TensorRTBuildError(
                f"TensorRT {version} failed to build {onnx_path.name} for {sm}; the log above says why "
                f"(a too small workspace, {workspace_gb} GB, is a common cause)"
            )
        out_dir.mkdir(parents=True, exist_ok=True)
        path = out_dir / engine_filename(onnx_path.stem, sm, version, precision)
        _atomic_write(path, bytes(serialized))
        if cache_path is not None:
            cache_path.parent.mkdir(parents=True, exist_ok=True)
            _atomic_write(cache_path, bytes(config.get_timing_cache().serialize()))
    seconds = time.perf_counter() - started
    say(f"wrote {path.name} in {seconds:.0f} s")
    return BuiltEngine(
        path=path,
        sm=sm,
        trt_version=version,
        precision=precision,
        input_name=input_name,
        profile=fitted,
        build_seconds=seconds,
        timing_cache=cache_path,
    )


# -- explicit quantization: the rules a QDQ graph must obey to build -------------

#: ONNX operators the TensorRT ONNX parser takes (onnx-tensorrt docs/operators.md, TensorRT 10.0, opsets 9-20:
#: every operator marked "Y"). Operators outside the default domain (com.microsoft ...) are never taken.
TENSORRT_ONNX_OPS = frozenset("""
Abs Acos Acosh Add And ArgMax ArgMin Asin Asinh Atan Atanh AveragePool BatchNormalization Cast CastLike Ceil Celu Clip
Concat Constant ConstantOfShape Conv ConvTranspose Cos Cosh CumSum DeformConv DepthToSpace DequantizeLinear Div Dropout
Einsum Elu Equal Erf Exp Expand EyeLike Flatten Floor GRU Gather GatherElements GatherND Gelu Gemm GlobalAveragePool
GlobalLpPool GlobalMaxPool Greater GreaterOrEqual GridSample GroupNormalization HardSigmoid HardSwish Hardmax Identity If
ImageScaler InstanceNormalization IsInf IsNaN LRN LSTM LayerNormalization LeakyRelu Less LessOrEqual Log LogSoftmax Loop
LpNormalization LpPool MatMul Max MaxPool Mean MeanVarianceNormalization Min Mish Mod Mul Neg NonMaxSuppression NonZero Not
OneHot Or PRelu Pad ParametricSoftplus Pow QuantizeLinear RNN RandomNormal RandomNormalLike RandomUniform RandomUniformLike
Range Reciprocal ReduceL1 ReduceL2 ReduceLogSum ReduceLogSumExp ReduceMax ReduceMean ReduceMin ReduceProd ReduceSum
ReduceSumSquare Relu Reshape Resize ReverseSequence RoiAlign Round ScaledTanh Scan Scatter ScatterElements ScatterND Selu
Shape Shrink Sigmoid Sign Sin Sinh Size Slice Softmax Softplus Softsign SpaceToDepth Split Sqrt Squeeze Sub Sum Tan Tanh
ThresholdedRelu Tile TopK Transpose Trilu Unsqueeze Upsample Where Xor
""".split())
#: The opsets that parser reads (TensorRT 10.0: 9 to 20).
TENSORRT_OPSETS = range(9, 21)
#: Per-channel weight scales lie along the output channels: axis 0 of a Conv's or a transposed Gemm's weight,
#: axis 1 of a MatMul's (K x N) or a plain Gemm's.
_OUTPUT_CHANNEL_AXIS = {"Conv": 0, "ConvTranspose": 1, "MatMul": 1}


def explicit_quantization_violations(model) -> list[str]:
    """What in a QDQ ONNX graph (a path or a ModelProto) TensorRT's explicit quantization refuses; empty when it builds.

    The rules: every QuantizeLinear/DequantizeLinear is int8 (TensorRT's only
    8-bit integer quantized type; uint8 only at network inputs and outputs) with
    a zero point of 0 (symmetric) and positive finite scales; activations are
    quantized per tensor (a scalar scale), weights per tensor or along their
    output channels; every node is an operator the ONNX parser takes, in the
    default domain, at an opset it reads.
    """
    import onnx
    from onnx import numpy_helper

    if not isinstance(model, onnx.ModelProto):
        model = onnx.load(str(model))
    graph = model.graph
    inits = {i.name: numpy_helper.to_array(i) for i in graph.initializer}
    constants = {n.output[0]: numpy_helper.to_array(n.attribute[0].t) for n in graph.node if n.op_type == "Constant" and n.attribute and n.attribute[0].type == onnx.AttributeProto.TENSOR}
    values = {**constants, **inits}
    consumers: dict[str, list] = {}
    for node in graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)
    found = []
    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), None)
    if opset not in TENSORRT_OPSETS:
        found.append(f"opset {opset}: TensorRT's ONNX parser reads opsets {TENSORRT_OPSETS.start}-{TENSORRT_OPSETS.stop - 1}")
    for node in graph.node:
        where = f"{node.op_type} {node.name or node.output[0]}"
        if node.domain not in ("", "ai.onnx"):
            found.append(f"{where}: domain {node.domain!r}, not an ONNX operator TensorRT parses")
            continue
        if node.op_type not in TENSORRT_ONNX_OPS:
            found.append(f"{where}: TensorRT's ONNX parser has no {node.op_type}")
            continue
        if node.op_type not in ("QuantizeLinear", "DequantizeLinear"):
            continue
        scale = values.get(node.input[1])
        zero = values.get(node.input[2]) if len(node.input) > 2 and node.input[2] else None
        if scale is None:
            found.append(f"{where}: its scale is computed, not a constant")
        elif not (np.all(np.isfinite(scale)) and np.all(scale > 0)):
            found.append(f"{where}: scales must be positive and finite")
        if zero is None:
            if node.op_type == "QuantizeLinear":  # without a zero point, ONNX quantizes to uint8
                found.append(f"{where}: no zero point, so it quantizes to uint8; TensorRT needs int8 with zero point 0")
        elif zero.dtype != np.int8:
            found.append(f"{where}: zero point of type {zero.dtype}; TensorRT takes int8 only")
        elif np.any(zero != 0):
            found.append(f"{where}: zero point {zero.ravel()[:4].tolist()}...; TensorRT needs 0 (symmetric)")
        if node.op_type == "DequantizeLinear" and node.input[0] in inits and inits[node.input[0]].dtype != np.int8:
            found.append(f"{where}: weights of type {inits[node.input[0]].dtype}; TensorRT takes int8")
        if scale is not None and scale.size > 1:
            weight = node.input[0] in inits
            if not weight:
                found.append(f"{where}: a per-channel scale on an activation; TensorRT quantizes activations per tensor")
            else:
                axis = next((a.i for a in node.attribute if a.name == "axis"), 1)
                for user in consumers.get(node.output[0], []):
                    want = _OUTPUT_CHANNEL_AXIS.get(user.op_type)
                    if user.op_type == "Gemm":
                        trans_b = next((a.i for a in user.attribute if a.name == "transB"), 0)
                        want = 0 if trans_b else 1
                    if want is not None and user.input[1] == node.output[0] and axis != want:
                        found.append(f"{where}: per-channel axis {axis}, but the output channels of {user.op_type} {user.name} are axis {want}")
    for tensor in list(graph.value_info):
        if tensor.type.tensor_type.elem_type == onnx.TensorProto.UINT8:
            found.append(f"tensor {tensor.name}: uint8 inside the network (TensorRT takes uint8 only as a network input or output)")
    return found


# -- the export pipeline's step ----------------------------------------------

#: Faster R-CNN: the host resizes every image so its sides are at most
#: max_size (and its shorter side at most min_size), then pads to a multiple of
#: the stride, so the graph's H and W range from one stride (very thin images)
#: to max_size rounded up to the stride.
FASTERRCNN_MIN_SIDE = 32


def manifest_profile(manifest: Manifest, plan: ExportPlan) -> tuple[tuple[Axis, Axis, Axis], tuple[int, int, int]]:
    """``(chw, (batch_min, batch_opt, batch_max))`` for the engine of an exported ONNX model.

    YOLO: a dynamic batch; the batch range is the manifest's (``--max-batch``
    or the pod's), opt the pod's aim, clamped into it. With a rect letterbox
    (``input.rect``, as YOLO.predict) one side is ``imgsz`` and the other any
    stride multiple up to it, so H and W range from the stride to ``imgsz``
    (opt: the square); a square letterbox is fixed at ``imgsz``. Faster R-CNN: its graph input is ``[1, 3, H, W]`` with dynamic H and
    W and a dynamic batch; H and W range from :data:`FASTERRCNN_MIN_SIDE` to
    max_size rounded up to the stride, opt at ``min_size x
    4/3 min_size``. Raises ValueError when the manifest lacks what it needs.
    """
    spec = manifest.input
    if manifest.family == "yolo":
        if not spec.imgsz:
            raise ValueError(f"the manifest of {manifest.name} gives no input.imgsz for the engine's input size")
        batch_max = max(int(manifest.batch.max or plan.max_batch), 1)
        batch_min = min(max(int(manifest.batch.min), 1), batch_max)
        batch_opt = min(max(int(manifest.batch.opt or plan.opt_batch), batch_min), batch_max)
        side: Axis = (spec.stride, spec.imgsz, spec.imgsz) if spec.rect else spec.imgsz
        return (3, side, side), (batch_min, batch_opt, batch_max)
    if manifest.family == "fasterrcnn":
        if not spec.min_size or not spec.max_size:
            raise ValueError(f"the manifest of {manifest.name} gives no input.min_size/max_size for the engine's profile")
        stride = spec.stride
        up = lambda v: -(-int(v) // stride) * stride  # noqa: E731 - round up to the stride
        high = up(max(spec.max_size, spec.min_size))
        low = min(FASTERRCNN_MIN_SIDE, high)
        opt_h = min(up(spec.min_size), high)
        opt_w = min(up(spec.min_size * 4 / 3), high)
        batch_max = max(int(manifest.batch.max or plan.max_batch), 1)
        batch_opt = min(max(int(manifest.batch.opt or plan.opt_batch), 1), batch_max)
        return (3, (low, opt_h, high), (low, opt_w, high)), (1, batch_opt, batch_max)
    raise ValueError(f"no TensorRT profile for model family {manifest.family!r}")


def engine_manifest(manifest: Manifest, built: BuiltEngine) -> Manifest:
    """The ONNX export's manifest, turned into the engine's (parity cleared until checked)."""
    bounds = tuple(built.profile[key][0] if len(built.profile[key]) == 4 else 1 for key in ("min", "opt", "max"))
    batch = manifest.batch.model_copy(update=dict(zip(("min", "opt", "max"), bounds)))
    updated = manifest.model_copy(
        update={
            "format": "tensorrt",
            "artifact": built.path.name,
            "artifact_sha256": sha256_file(built.path),
            "gpu_arch": built.sm,
            "tensorrt_version": built.trt_version,
            "precision": built.precision,
            "batch": BatchSpec.model_validate(batch.model_dump()),
            "versions": {**manifest.versions, "tensorrt": built.trt_version},
            "parity": None,
        }
    )
    # model_copy does not validate; a manifest the runtime will refuse must fail here.
    return Manifest.model_validate(updated.model_dump())


def engine_parity(
    req: ExportRequest,
    out: Path,
    manifest: Manifest,
    *,
    engine: Engine | None = None,
    reference: Callable[[np.ndarray], Detections] | None = None,
    images: list[np.ndarray] | None = None,
    device: int = 0,
) -> Parity:
    """Run the engine (through ``Detector``, as served) and the source model on the same images.

    ``manifest`` is the engine's. ``engine`` defaults to a :class:`TensorRTEngine`
    on ``out / manifest.artifact`` (sha256 checked), ``reference`` to
    :func:`export.reference.source_reference`, ``images`` to ``req.parity_images`` or
    :func:`export.reference.parity_images`. Boxes match as in the ONNX check
    (same class, IoU >= 0.99). The threshold is ``req.parity_threshold`` for
    fp32 and fp16 alike: fp16 engines move boxes by a fraction of a pixel, so
    on small boxes IoU >= 0.99 fails more often and the matched share can be
    lower than the fp32 ONNX graph's; ``build_for_manifest``'s error then says
    to rebuild with ``--precision fp32`` or lower ``--parity-threshold``.
    Raises TensorRTUnavailable, EngineMismatch or ManifestError when the engine
    does not load.
    """
    from detserve.runtime.detector import Detector
    from detserve.runtime.manifest import verify_artifact
    from detserve.export.parity import measure
    from detserve.export.pipeline import PARITY_CONF
    from detserve.export.reference import source_reference

    out = Path(out)
    conf = req.parity_conf if req.parity_conf is not None else PARITY_CONF
    if images is None:
        if req.parity_images is not None:
            images = req.parity_images
        else:
            from detserve.export.reference import parity_images

            images = parity_images()
    with step("Loading the TensorRT engine and its source", req.quiet):
        if engine is None:
            engine = TensorRTEngine(
                verify_artifact(out, manifest),
                expected_sm=manifest.gpu_arch,
                expected_trt=manifest.tensorrt_version,
                device=device,
            )
        detector = Detector(out, manifest=manifest, engine=engine)
        params = detector.params(conf=conf)
        if reference is None:
            reference = source_reference(out, manifest, conf=conf, iou=params.iou)
    return measure(
        lambda image, p: detector.detect([image], p)[0],
        reference,
        images,
        params,
        threshold=req.parity_threshold,
        what=f"TensorRT engine, {manifest.precision}",
        quiet=req.quiet,
    )


def _print_dim(message: str) -> None:
    from detserve.runtime.progress import console

    console.print(f"  {message}", style="dim", markup=False, highlight=False)


def _one_line(exc: BaseException) -> str:
    return "; ".join(line.strip() for line in str(exc).splitlines() if line.strip()) or type(exc).__name__


def build_for_manifest(req: ExportRequest, out: Path, manifest: Manifest, plan: ExportPlan) -> Manifest:
    """Build the TensorRT engine for an ONNX export, check its parity on the GPU, rewrite the manifest.

    ``manifest`` describes ``out / manifest.artifact``, the ONNX model already
    written and parity-checked; it stays in the folder beside the engine (and
    the timing cache, ``timing.<sm>.trt<x.y>.cache``). Returns the engine's
    manifest, also written to ``out``. Every failure is an ``ExportError`` with
    one line; until the engine passes, ``out`` keeps the ONNX export's manifest,
    which serves with onnxruntime. A failed parity check still writes the
    engine's manifest, with the figures, like the ONNX check does.
    """
    from detserve.runtime.manifest import MANIFEST_NAME
    from detserve.export.pipeline import ExportError  # here: export.pipeline imports this module lazily

    out = Path(out)
    kept = f"the ONNX export in {out} is complete and serves with onnxruntime"
    if plan.format != "tensorrt" or not plan.gpu_arch:
        raise ExportError(f"the export plan for pod {plan.pod.name!r} is not a TensorRT engine ({plan.format}); nothing to build")
    try:
        chw, (batch_min, batch_opt, batch_max) = manifest_profile(manifest, plan)
    except ValueError as exc:
        raise ExportError(f"cannot build a TensorRT engine: {_one_line(exc)}") from None

    progress = None if req.quiet else _print_dim
    title = f"Building TensorRT engine ({plan.precision}, {plan.gpu_arch}, batch {batch_min}/{batch_opt}/{batch_max}; takes minutes)"
    try:
        with step(title, req.quiet):
            built = build_engine(
                out / manifest.artifact,
                out,
                input_name=manifest.input.name,
                chw=chw,
                batch_min=batch_min,
                batch_opt=batch_opt,
                batch_max=batch_max,
                fp16=plan.precision == "fp16",
                timing_cache=out,
                expected_sm=plan.gpu_arch,
                progress=progress,
            )
    except TensorRTUnavailable as exc:
        raise ExportError(f"cannot build a TensorRT engine: {_one_line(exc)} ({kept})") from None
    except (TensorRTBuildError, ValueError, OSError) as exc:  # GpuMismatch is a TensorRTBuildError
        raise ExportError(f"TensorRT engine build failed: {_one_line(exc)} ({kept})") from None

    try:
        new = engine_manifest(manifest, built)
    except ValueError as exc:  # pydantic's ValidationError is a ValueError
        raise ExportError(f"the engine {built.path.name} does not fit the manifest: {_one_line(exc)}") from None
    try:
        parity = engine_parity(req, out, new)
    except (TensorRTUnavailable, EngineMismatch, ManifestError) as exc:
        raise ExportError(f"the TensorRT engine {built.path.name} does not load here: {_one_line(exc)} ({kept})") from None
    except ValueError as exc:  # e.g. a parity image outside the engine's profile
        raise ExportError(f"the TensorRT engine parity check could not run: {_one_line(exc)} ({kept})") from None
    new = new.model_copy(update={"parity": parity})
    write_manifest(out, new)
    if not parity.passed:
        advice = (
            "fp16 moves boxes slightly: rebuild with --precision fp32, or lower --parity-threshold if the figures are acceptable"
            if built.precision == "fp16"
            else "check the figures, or compare with the ONNX export's parity"
        )
        raise ExportError(
            f"TensorRT engine parity check failed: the {built.precision} engine matched {parity.matched_share:.1%} of the "
            f"source model's boxes (same class, IoU >= 0.99), below --parity-threshold {req.parity_threshold:.2f}; "
            f"{advice} (figures kept in {out / MANIFEST_NAME})"
        )
    if plan.int8:
        new = add_int8_engine(req, out, manifest, new, plan, progress=progress)
    return new


#: The variant name of an int8 engine built from the TensorRT encoding.
INT8_ENGINE_VARIANT = "int8-trt-engine"


def add_int8_engine(req: ExportRequest, out: Path, onnx_manifest: Manifest, manifest: Manifest, plan: ExportPlan,
                    progress: Callable[[str], None] | None = None) -> Manifest:  # fmt: skip
    """Build the int8 engine from the TensorRT encoding (``model.int8-trt.onnx``), gate it like the ONNX variants, record it.

    ``onnx_manifest`` is the exact fp32 ONNX export (the gate's reference),
    ``manifest`` the engine manifest the folder has now; returns it with the
    ``int8-trt-engine`` variant, written to ``out``. The engine's gate runs it
    through ``Detector`` on this GPU, against the fp32 ONNX on onnxruntime.
    """
    from detserve.export.pipeline import ExportError
    from detserve.export.quantize import TRT_ENCODING, agreement_set, gate_variant, val_set
    from detserve.runtime.manifest import MANIFEST_NAME, Variant, replace_variant

    source = next((v for v in manifest.variants if v.name == TRT_ENCODING.variant), None)
    if source is None or source.gate is None:
        raise ExportError(f"no gated {TRT_ENCODING.variant} encoding in {out} to build an int8 engine from: export with --precision int8")
    chw, (batch_min, batch_opt, batch_max) = manifest_profile(onnx_manifest, plan)
    try:
        with step(f"Building the int8 TensorRT engine from {source.artifact} (explicit quantization; takes minutes)", req.quiet):
            built = build_engine(
                out / source.artifact, out, input_name=onnx_manifest.input.name, chw=chw, batch_min=batch_min, batch_opt=batch_opt,
                batch_max=batch_max, fp16=False, int8=True, timing_cache=out, expected_sm=plan.gpu_arch, progress=progress,
            )  # fmt: skip
    except (TensorRTUnavailable, TensorRTBuildError, ValueError, OSError) as exc:
        raise ExportError(f"int8 TensorRT engine build failed: {_one_line(exc)} (the {manifest.precision} engine in {out} serves)") from None
    bounds = [built.profile[key][0] if len(built.profile[key]) == 4 else 1 for key in ("min", "opt", "max")]
    variant = Variant(
        name=INT8_ENGINE_VARIANT, precision="int8", format="tensorrt", artifact=built.path.name, artifact_sha256=sha256_file(built.path),
        target="gpu", encoding=f"TensorRT engine built from {source.artifact} by explicit quantization, strongly typed network",
        float_nodes=source.float_nodes, gpu_arch=built.sm, tensorrt_version=built.trt_version, built_from=source.name,
        batch=onnx_manifest.batch.model_copy(update=dict(zip(("min", "opt", "max"), bounds))),
    )  # fmt: skip
    val, val_source = val_set(req, onnx_manifest)
    try:
        gate, _ = gate_variant(
            req, out, onnx_manifest, variant, (source.gate.calibration, source.gate.calibration_images), agreement_set(req), val, val_source,
            backend="tensorrt", device="cuda:0",
        )  # fmt: skip
    except (TensorRTUnavailable, EngineMismatch, ManifestError) as exc:
        raise ExportError(f"the int8 engine {built.path.name} does not load here: {_one_line(exc)}") from None
    manifest = replace_variant(manifest, variant.model_copy(update={"gate": gate}))
    write_manifest(out, manifest)
    if not gate.passed:
        raise ExportError(f"int8 accuracy gate failed for {INT8_ENGINE_VARIANT}: {gate.reason} (figures kept in {out / MANIFEST_NAME})")
    return manifest
