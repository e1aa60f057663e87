"""fp32 ONNX -> int8 variants: one calibration, a QDQ encoding per runtime, each checked and gated.

``add_int8_variants`` is the export stage of ``--precision int8``. It runs
after the fp32 export passed parity, and adds to the same folder:

- ``model.int8-cpu.onnx``: for onnxruntime's CPU provider on x86. Unsigned
  (asymmetric) int8 activations, per-tensor; signed symmetric int8 weights,
  per output channel. onnxruntime fuses this QDQ form into its U8S8 kernels
  (``QLinearConv`` ...), which use the VNNI dot products of the CPUs here.
- ``model.int8-trt.onnx``: for TensorRT's explicit quantization. Signed int8
  activations and weights, symmetric (zero points 0), Q/DQ only at the
  inputs of convolutions and matrix products (what TensorRT's guidance and
  NVIDIA's ModelOpt quantize). On an x86 CPU onnxruntime does not fuse this
  form and runs it slower than fp32, which is why there are two files.

Both come from the same calibration (``onnxruntime.quantization``'s
calibration cache: the tensor ranges are measured once and written to
``int8-calibration.json``), on images that then play no part in the gate
(``export/gate.py``). The CPU encoding's optimized graph is read back to count
the node types onnxruntime executes, so the manifest shows it runs on int8
kernels and not on a graph dequantized back to float.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
import warnings
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Literal

import numpy as np

from detserve.runtime.manifest import (
    MANIFEST_NAME, Gate, Kernels, Manifest, Variant, replace_variant, sha256_file, variant_manifest, write_manifest,
)  # fmt: skip
from detserve.runtime.progress import step

if TYPE_CHECKING:
    import onnx

    from detserve.export.pipeline import ExportRequest
    from detserve.training.datasets import LabelledImage

#: Where the calibration's tensor ranges are kept: a TensorRT encoding can be rebuilt from them without images.
CALIBRATION_NAME = "int8-calibration.json"

#: Generated scenes that calibrate when no --calibration is given, and those that judge agreement: different seeds.
CALIBRATION_SEED, CALIBRATION_SCENES = 7001, 24
AGREEMENT_SEED, AGREEMENT_SCENES = 7002, 16

#: The CPU encoding must run at least this share of its convolutions and matrix products on int8 kernels.
MIN_INT8_SHARE = 0.5

#: Node types of onnxruntime's CPU provider that compute in int8 (QDQ groups fused into them).
INT8_COMPUTE_OPS = frozenset({"QLinearConv", "QLinearMatMul", "QGemm", "MatMulInteger", "ConvInteger", "MatMulIntegerToFloat", "DynamicQuantizeMatMul"})
#: ... and those that compute convolutions and matrix products in float.
FLOAT_COMPUTE_OPS = frozenset({"Conv", "FusedConv", "NhwcFusedConv", "MatMul", "FusedMatMul", "Gemm", "FusedGemm"})


@dataclass(frozen=True)
class Encoding:
    """One runtime's QDQ form of the same calibration."""

    variant: str
    file: str
    activations: Literal["uint8", "int8"]
    symmetric_activations: bool
    target: Literal["cpu", "gpu"]
    op_types: tuple[str, ...] | None  # None: every op type onnxruntime can quantize
    description: str
    # onnxruntime folds int32 biases into its int8 kernels; TensorRT's DequantizeLinear takes int8 only
    # and wants float biases, which it quantizes itself.
    quantize_bias: bool = True


CPU_ENCODING = Encoding(
    "int8-cpu", "model.int8-cpu.onnx", "uint8", False, "cpu", None,
    "QDQ: uint8 activations (asymmetric, per tensor), int8 weights (symmetric, per output channel); "
    "onnxruntime's CPU provider fuses it into U8S8 int8 kernels",
)  # fmt: skip
TRT_ENCODING = Encoding(
    "int8-trt", "model.int8-trt.onnx", "int8", True, "gpu", ("Conv", "ConvTranspose", "Gemm", "MatMul"),
    "QDQ: int8 activations (symmetric, per tensor) and weights (symmetric, per output channel), zero points 0, "
    "at the inputs of convolutions and matrix products, float biases: TensorRT's explicit quantization",
    quantize_bias=False,
)  # fmt: skip
ENCODINGS = (CPU_ENCODING, TRT_ENCODING)


# --- what stays in float ----------------------------------------------------------


@dataclass(frozen=True)
class FloatPlan:
    """Which nodes quantize: ``nodes_to_quantize`` (None: all but ``nodes_to_exclude``), and why the rest stays float."""

    nodes_to_quantize: list[str] | None
    nodes_to_exclude: list[str]
    reasons: list[str]


def yolo_float_plan(model: onnx.ModelProto) -> FloatPlan:
    """YOLO: everything quantizes except the Detect head's tail; its box and class convs (cv2, cv3) quantize.

    Kept in float:
    - the DFL (softmax over 16 distance bins, then their expectation): the
      expectation multiplies bins by 0..15, so an int8 step on a bin's
      probability moves a box edge by up to a pixel per stride; reports of 0 mAP
      when it is quantized (onnxruntime #10787, #14233);
    - the box decode (anchor points + distances, times the stride): absolute
      pixel coordinates up to the input size, where one int8 step of a
      640 px range is 2.5 px;
    - the output concat of boxes (pixels, 0..imgsz) with class scores (0..1):
      one shared scale for both ranges would leave the scores a handful of
      int8 levels.
    """
    names = [n.name for n in model.graph.node]
    heads = {int(n.split("/")[1].split(".")[1]) for n in names if n.startswith("/model.") and n.split("/")[1].split(".")[1].isdigit()}
    if not heads:
        raise ValueError("no /model.N/ node names: not an Ultralytics YOLO export")
    head = f"/model.{max(heads)}/"
    tail = [n for n in names if n.startswith(head) and "/cv2." not in n and "/cv3." not in n]
    return FloatPlan(None, tail, [
        f"{head}dfl (softmax + expectation over 16 bins): an int8 step on a bin moves a box edge by up to a pixel per stride",
        f"{head} box decode (anchors + distances, x stride): absolute pixels up to the input size, 2.5 px per int8 step at 640",
        f"{head} output concat: boxes in pixels and class scores in 0..1 cannot share one int8 scale",
    ])  # fmt: skip


#: Faster R-CNN node-name prefixes that quantize (torchvision module names in the traced graph).
FASTERRCNN_QUANTIZED = ("/backbone/", "/rpn_head/", "/box_head/")


def fasterrcnn_float_plan(model: onnx.ModelProto) -> FloatPlan:
    """Faster R-CNN: the backbone, FPN, RPN head and the RoI box head's two fully connected layers quantize.

    The box head's fc6/fc7 run after RoIAlign and are most of the model's
    cost (a 12544 x 1024 matrix product per proposal); quantizing them was
    measured safe on the default model (docs/precision.md), so they do.
    Kept in float:
    - the box predictor (class scores and the per-class box regression): its
      deltas are scaled by exp() and the box size, so an int8 step becomes
      pixels, and the class logits feed a softmax whose top scores decide
      what is kept;
    - the RPN's anchor decode, the RoIAlign sampling coordinates, every NMS and
      the final box decode: coordinates in pixels and indices, not features.
    """
    quantized = [n.name for n in model.graph.node if n.name.startswith(FASTERRCNN_QUANTIZED)]
    if not quantized:
        raise ValueError("no /backbone/ node names: not a detserve Faster R-CNN export")
    return FloatPlan(quantized, [], [
        "/box_predictor/ (class logits and per-class box regression): regression deltas go through exp() and scale by the box size",
        "anchor and box decodes, RoIAlign sampling, NMS: pixel coordinates and indices, not features",
    ])  # fmt: skip


def float_plan(model: onnx.ModelProto, family: str) -> FloatPlan:
    return yolo_float_plan(model) if family == "yolo" else fasterrcnn_float_plan(model)


# --- calibration ------------------------------------------------------------------


@dataclass(frozen=True)
class ImageSet:
    images: list[np.ndarray]
    source: str


def _reader(images: list[np.ndarray], manifest: Manifest, input_names: list[str]):
    """A CalibrationDataReader: each image prepared as the server prepares it (letterbox or torchvision's resize), batch 1."""
    from onnxruntime.quantization import CalibrationDataReader

    from detserve.runtime.preprocess import pack_inputs, prepare

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self.left = iter(images)

        def get_next(self) -> dict | None:
            image = next(self.left, None)
            if image is None:
                return None
            return dict(zip(input_names, pack_inputs([prepare(image, manifest.input)], manifest.input), strict=True))

    return Reader()


def quantize_encodings(
    src: Path, out: Path, manifest: Manifest, images: list[np.ndarray], encodings: tuple[Encoding, ...] = ENCODINGS
) -> tuple[dict[str, Path], FloatPlan]:
    """Calibrate ``src`` once on ``images``; write each encoding to ``out``; returns ({variant: path}, what stayed float)."""
    import onnx
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    os.environ.setdefault("ORT_DISABLE_TELEMETRY", "1")
    written = {}
    with tempfile.TemporaryDirectory(prefix="detserve-int8-") as tmp:
        pre = Path(tmp) / "pre.onnx"
        # Shape inference + onnxruntime's basic graph fusions, as the quantizer expects; symbolic shape
        # inference fails on the Ultralytics graph and is not needed for static quantization.
        quant_pre_process(str(src), str(pre), skip_symbolic_shape=True)
        model = onnx.load(str(pre))
        plan = float_plan(model, manifest.family)
        input_names = [i.name for i in model.graph.input]
        cache = Path(tmp) / CALIBRATION_NAME
        for encoding in encodings:
            path = out / encoding.file
            with warnings.catch_warnings():
                # The calibrator records every tensor, the float part's constants too (Faster R-CNN pads
                # with -inf); numpy warns on their ranges, which no quantized node uses.
                warnings.simplefilter("ignore", RuntimeWarning)
                quantize_static(
                    str(pre), str(path),
                    # The first encoding calibrates and fills the cache; the next reads the same tensor ranges.
                    _reader(images, manifest, input_names) if not cache.exists() else None,
                    quant_format=QuantFormat.QDQ,
                    op_types_to_quantize=list(encoding.op_types) if encoding.op_types else None,
                    per_channel=True,
                    activation_type=QuantType.QUInt8 if encoding.activations == "uint8" else QuantType.QInt8,
                    weight_type=QuantType.QInt8,
                    nodes_to_quantize=plan.nodes_to_quantize,
                    nodes_to_exclude=plan.nodes_to_exclude,
                    calibrate_method=CalibrationMethod.MinMax,
                    calibration_cache_path=str(cache),
                    extra_options={"WeightSymmetric": True, "ActivationSymmetric": encoding.symmetric_activations,
                                   "QuantizeBias": encoding.quantize_bias},
                )  # fmt: skip
            written[encoding.variant] = path
        shutil.copyfile(cache, out / CALIBRATION_NAME)
    return written, plan


# --- what onnxruntime runs ----------------------------------------------------------


def count_kernels(path: Path) -> Kernels:
    """The node types of the graph onnxruntime's CPU provider runs for ``path`` (serving options, all optimizations)."""
    import onnx
    import onnxruntime as ort

    from detserve.runtime.engines.onnx import session_options

    with tempfile.TemporaryDirectory(prefix="detserve-kernels-") as tmp:
        options = session_options(1)
        options.optimized_model_filepath = str(Path(tmp) / "optimized.onnx")
        ort.InferenceSession(str(path), sess_options=options, providers=["CPUExecutionProvider"])
        ops = Counter(node.op_type for node in onnx.load(options.optimized_model_filepath).graph.node)
    int8 = sum(ops[o] for o in INT8_COMPUTE_OPS)
    fp = sum(ops[o] for o in FLOAT_COMPUTE_OPS)
    return Kernels(ops=dict(sorted(ops.items())), int8_compute=int8, float_compute=fp, int8_share=round(int8 / max(int8 + fp, 1), 4))


# --- the images of each role ----------------------------------------------------------


def _fingerprint(image: np.ndarray) -> str:
    return hashlib.sha1(np.ascontiguousarray(image).tobytes() + str(image.shape).encode()).hexdigest()


def _split_parity_images() -> tuple[list[np.ndarray], list[np.ndarray]]:
    """The parity images (two photos, six scenes) cut in two halves: one calibrates, the other judges."""
    from detserve.export.reference import parity_images

    images = parity_images()
    return images[0::2], images[1::2]


def calibration_set(req: ExportRequest) -> ImageSet:
    """``--calibration DIR`` (the user's photos); else half the parity images and generated scenes, with a warning."""
    from detserve.training.synthetic import scenes

    if req.calibration_images is not None:
        return ImageSet(list(req.calibration_images), f"{len(req.calibration_images)} images given by the caller")
    if req.calibration is not None:
        from detserve.runtime.images import decode
        from detserve.training.datasets import image_files

        files = image_files(Path(req.calibration))
        if not files:
            raise ValueError(f"--calibration {req.calibration}: no images there (jpg, png, ...)")
        return ImageSet([decode(f) for f in files], f"--calibration {req.calibration} ({len(files)} images)")
    half, _ = _split_parity_images()
    generated = [s.image for s in scenes(CALIBRATION_SCENES, CALIBRATION_SEED)]
    if not req.quiet:
        from detserve.runtime.progress import console

        console.print(
            "[yellow]warning:[/] no --calibration images: calibrating int8 on a photo and generated scenes. "
            "Photos like the ones you will serve calibrate better: pass --calibration DIR (a few dozen of them)."
        )
    return ImageSet(half + generated, f"half the parity images + generated scenes (seed {CALIBRATION_SEED}), {len(half) + len(generated)} images")


def agreement_set(req: ExportRequest) -> ImageSet:
    """Held-out images for agreement: the parity images when the user calibrated; else the other half of them and other scenes."""
    from detserve.training.synthetic import scenes

    if req.agreement_images is not None:
        return ImageSet(list(req.agreement_images), f"{len(req.agreement_images)} images given by the caller")
    if req.calibration is not None or req.calibration_images is not None:
        from detserve.export.reference import parity_images

        images = parity_images()
        return ImageSet(images, f"the parity images ({len(images)}: 2 photos, generated scenes)")
    _, half = _split_parity_images()
    generated = [s.image for s in scenes(AGREEMENT_SCENES, AGREEMENT_SEED)]
    return ImageSet(half + generated, f"the other half of the parity images + generated scenes (seed {AGREEMENT_SEED}), {len(half) + len(generated)} images")


def val_set(req: ExportRequest, manifest: Manifest) -> tuple[list[LabelledImage] | None, str]:
    """``--val DIR`` as labelled images in the model's label names (or the caller's), and where they came from."""
    if req.val_images is not None:
        return list(req.val_images), req.val_source or f"{len(req.val_images)} labelled images given by the caller"
    if req.val is None:
        return None, ""
    from detserve.training.datasets import read_labelled

    names = [manifest.labels[k] for k in sorted(manifest.labels)]
    data = read_labelled(Path(req.val), names)
    return data, f"--val {req.val} ({len(data)} images)"


def check_held_out(calibration: ImageSet, judged: dict[str, list[np.ndarray]]) -> None:
    """Calibrate on one set, judge on another: refuse any image in both."""
    seen = {_fingerprint(image) for image in calibration.images}
    for role, images in judged.items():
        both = sum(_fingerprint(image) in seen for image in images)
        if both:
            raise ValueError(
                f"{both} of the {role} images also calibrate the int8 model ({calibration.source}); "
                "calibrate and judge on different images"
            )


# --- the export stage -----------------------------------------------------------------


def add_int8_variants(req: ExportRequest, out: Path, manifest: Manifest, target: Literal["cpu", "gpu"]) -> Manifest:
    """Quantize the exact fp32 ONNX in ``out``, gate each encoding, record them as variants; returns the manifest written.

    Raises ExportError (figures kept in the manifest) when the gate of the
    encoding for ``target`` (the pod's kind) fails or the CPU encoding does not
    run on int8 kernels; the other encoding's failed gate is recorded and
    warned about.
    """
    from detserve.export.pipeline import ExportError
    from detserve.runtime.progress import console

    try:
        calibration = calibration_set(req)
        agreed_on = agreement_set(req)
        val, val_source = val_set(req, manifest)
        check_held_out(calibration, {"agreement": agreed_on.images, "--val": [d.image for d in val or []]})
    except ValueError as exc:
        raise ExportError(str(exc)) from None
    with step(f"Calibrating int8 on {len(calibration.images)} images, writing the CPU and TensorRT encodings", req.quiet):
        written, plan = quantize_encodings(out / manifest.artifact, out, manifest, calibration.images)
    variants = []
    for encoding in ENCODINGS:
        path = written[encoding.variant]
        variant = Variant(
            name=encoding.variant, precision="int8", format="onnx", artifact=path.name, artifact_sha256=sha256_file(path),
            target=encoding.target, encoding=encoding.description, float_nodes=plan.reasons, kernels=count_kernels(path),
        )  # fmt: skip
        if encoding.target == "gpu":
            from detserve.export.tensorrt import explicit_quantization_violations

            broken = explicit_quantization_violations(path)
            if broken:
                raise ExportError(f"the TensorRT encoding breaks TensorRT's explicit-quantization rules: {'; '.join(broken[:5])}")
        elif variant.kernels.int8_share < MIN_INT8_SHARE:
            k = variant.kernels
            raise ExportError(
                f"onnxruntime runs the int8 CPU encoding mostly in float ({k.int8_compute} int8 vs {k.float_compute} float "
                f"convolutions/matrix products): it would be no faster than fp32"
            )
        variants.append(variant)
    reference_metrics = None
    for variant in variants:
        gate, reference_metrics = gate_variant(
            req, out, manifest, variant, (calibration.source, len(calibration.images)), agreed_on, val, val_source, reference_metrics
        )
        manifest = replace_variant(manifest, variant.model_copy(update={"gate": gate}))
        write_manifest(out, manifest)
        if not req.quiet:
            mark = "[green]passed[/]" if gate.passed else "[red]failed[/]"
            console.print(f"int8 gate {mark} for {variant.name}: {gate.reason}")
    mine = next(v for v in manifest.variants if v.target == target and v.precision == "int8")
    for other in manifest.variants:
        if other is not mine and other.gate is not None and not other.gate.passed and not req.quiet:
            console.print(f"[yellow]warning:[/] {other.name} failed its gate; it is kept but never served")
    if not mine.gate.passed:
        raise ExportError(
            f"int8 accuracy gate failed for {mine.name}: {mine.gate.reason}. The figures are in {out / MANIFEST_NAME}; "
            f"the exact export in {out} is complete and serves (precision fp32)"
        )
    return manifest


def gate_variant(req, out: Path, manifest: Manifest, variant: Variant, calibrated: tuple[str, int], agreed_on: ImageSet,
                 val, val_source: str, reference_metrics=None, *, backend: str = "onnxruntime", device: str = "cpu") -> tuple[Gate, object]:  # fmt: skip
    """Run the exact fp32 ONNX (onnxruntime, CPU) and ``variant`` (on ``backend``/``device``) on the held-out images.

    ``calibrated``: (what calibrated the variant, how many images). Returns (gate, the exact artifact's val metrics, to reuse).
    """
    from detserve.export import gate as gatelib
    from detserve.runtime.detector import Detector
    from detserve.runtime.engines import load_engine

    exact = manifest.model_copy(update={"variants": []})
    reference = Detector(out, manifest=exact, engine=load_engine(out, backend="onnxruntime", device="cpu", manifest=exact))
    candidate_manifest = variant_manifest(manifest, variant)
    candidate = Detector(out, manifest=candidate_manifest, engine=load_engine(out, backend=backend, device=device, manifest=candidate_manifest))
    params = reference.params()

    def run(detector: Detector):
        return lambda image, p: detector.run([detector.prepare(image)], p)[0]

    with step(f"Gating {variant.name}: agreement with fp32 on {len(agreed_on.images)} held-out images"
              + (f", mAP on {len(val)} labelled images" if val else ""), req.quiet):  # fmt: skip
        agreed = gatelib.agreement(run(reference), run(candidate), agreed_on.images, params, reference.labels, agreed_on.source)
        figures = None
        if val:
            if reference_metrics is None:
                low = gatelib.DetectParams(conf=gatelib.MAP_CONF, iou=params.iou, max_det=params.max_det)
                reference_metrics = gatelib.val_map(run(reference), val, low, reference.labels)
            figures = gatelib.val_figures(run(reference), run(candidate), val, params, reference.labels, val_source, reference_metrics)
    gate = gatelib.decide(
        agreed, figures, calibration=calibrated[0], calibration_images=calibrated[1],
        max_map_drop=req.max_map_drop, min_found_share=req.min_found_share,
    )  # fmt: skip
    return gate, reference_metrics
