"""onnxruntime engine: CPU, CUDA and TensorRT execution providers."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from detserve.runtime.manifest import Manifest, verify_artifact


def session_options(threads: int):
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.intra_op_num_threads = max(1, threads)
    options.inter_op_num_threads = 1
    # Spinning threads burn the cores that decode and HTTP need; measured on
    # 2 busy cores, allow_spinning=0 held latency far better (NOTES.md).
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    options.log_severity_level = 3
    return options


def wants_tensorrt_ep(manifest: Manifest, device: str) -> bool:
    """Use onnxruntime's TensorRT provider on a GPU pod whose GPU TensorRT supports, when it is installed."""
    if device == "cpu":
        return False
    import onnxruntime as ort

    from detserve.runtime.pods import PODS

    pod = PODS.get(manifest.pod)
    return bool(pod and pod.tensorrt_supported) and "TensorrtExecutionProvider" in ort.get_available_providers()


def providers_for(device: str, manifest: Manifest, folder: Path, trt: bool = False) -> list:
    """The provider list for a device: CUDA with FP16-friendly settings, optionally TensorRT first."""
    if device == "cpu":
        return ["CPUExecutionProvider"]
    device_id = int(device.split(":")[1]) if ":" in device else 0
    cuda = (
        "CUDAExecutionProvider",
        {"device_id": device_id, "cudnn_conv_algo_search": "HEURISTIC", "do_copy_in_default_stream": True},
    )
    providers: list = [cuda, "CPUExecutionProvider"]
    if trt:
        cache = folder / "trt-cache"
        cache.mkdir(exist_ok=True)
        spec = manifest.input
        side = spec.imgsz
        shape = f"{spec.name}:{{}}x3x{{}}x{{}}"
        trt_options = {
            "device_id": device_id,
            "trt_fp16_enable": manifest.precision == "fp16",
            # An int8 variant is a QDQ graph (explicit quantization); TensorRT's weakly typed
            # networks, which this provider builds, take Q/DQ layers only with INT8 enabled.
            "trt_int8_enable": manifest.precision == "int8",
            "trt_engine_cache_enable": True,
            "trt_engine_cache_path": str(cache),
            "trt_timing_cache_enable": True,
            "trt_timing_cache_path": str(cache),
        }
        if side:  # an optimisation profile over the batch axis (and H/W for rect letterboxes)
            low = spec.stride if spec.rect else side
            trt_options |= {
                "trt_profile_min_shapes": shape.format(manifest.batch.min, low, low),
                "trt_profile_opt_shapes": shape.format(manifest.batch.opt, side, side),
                "trt_profile_max_shapes": shape.format(manifest.batch.max, side, side),
            }
        providers.insert(0, ("TensorrtExecutionProvider", trt_options))
    return providers


def to_fp16(path: Path) -> bytes:
    """An fp16 copy of an fp32 ONNX graph, inputs and outputs kept fp32 (for onnxruntime's CUDA provider)."""
    import onnx
    from onnxruntime.transformers.float16 import convert_float_to_float16

    model = convert_float_to_float16(onnx.load(str(path)), keep_io_types=True, disable_shape_infer=False)
    return model.SerializeToString()


class OnnxEngine:
    """An onnxruntime session over the manifest's ONNX artifact."""

    def __init__(self, folder: Path, manifest: Manifest, *, device: str = "cpu", threads: int = 1, trt: bool = False):
        os.environ.setdefault("ORT_DISABLE_TELEMETRY", "1")
        import onnxruntime as ort

        path = verify_artifact(folder, manifest)
        model: str | bytes = str(path)
        if device != "cpu" and manifest.precision == "fp16" and not trt:
            # The artifact is the fp32 graph that passed parity; on a GPU pod
            # that asks for fp16 (V100: no TensorRT), run a half-precision copy.
            model = to_fp16(path)
        self.session = ort.InferenceSession(
            model, sess_options=session_options(threads), providers=providers_for(device, manifest, folder, trt)
        )
        active = self.session.get_providers()[0]
        self.device = "cpu" if active == "CPUExecutionProvider" else device
        self.name = {
            "CPUExecutionProvider": "onnxruntime-cpu",
            "CUDAExecutionProvider": "onnxruntime-cuda",
            "TensorrtExecutionProvider": "onnxruntime-tensorrt",
        }.get(active, f"onnxruntime-{active}")
        self.max_batch = manifest.batch.max
        self.input_names = [i.name for i in self.session.get_inputs()]
        self.input_dtype = np.float16 if "float16" in self.session.get_inputs()[0].type else np.float32
        self.output_names = [o.name for o in self.session.get_outputs()]
        self._binding = self.session.io_binding() if self.device != "cpu" else None

    def run(self, batch: np.ndarray, *extra: np.ndarray) -> list[np.ndarray]:
        """The image tensor, then any further inputs the graph takes (Faster R-CNN: image_sizes, original_sizes)."""
        inputs = dict(zip(self.input_names, (np.ascontiguousarray(batch, dtype=self.input_dtype), *extra), strict=True))
        if self._binding is None:
            return self.session.run(self.output_names, inputs)
        # CUDA: IOBinding copies the input once and keeps outputs on the device
        # until we ask for them, instead of ORT's per-run host round trips.
        binding = self._binding
        binding.clear_binding_inputs()
        binding.clear_binding_outputs()
        for name, array in inputs.items():
            binding.bind_cpu_input(name, array)
        for name in self.output_names:
            binding.bind_output(name, "cuda")
        self.session.run_with_iobinding(binding)
        return [np.asarray(o, dtype=np.float32) if o.dtype == np.float16 else o for o in binding.copy_outputs_to_cpu()]
