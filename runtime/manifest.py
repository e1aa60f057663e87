"""The export manifest: everything the runtime needs to serve an artifact.

``export`` writes ``manifest.json`` beside the artifact; engines, adapters and
the server load a model from that folder and nothing else. The schema is a
pydantic model so that a hand-edited or truncated manifest fails with a message
that names the field.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

MANIFEST_NAME = "manifest.json"
SCHEMA_VERSION = 1

Family = Literal["yolo", "fasterrcnn"]
# "aoti": a torch AOTInductor package (runtime/engines/compiled.py), built on the target GPU
Format = Literal["onnx", "tensorrt", "aoti"]
Precision = Literal["fp32", "fp16", "int8"]
#: Where a variant runs fast: onnxruntime's CPU provider, or a GPU (TensorRT).
Target = Literal["cpu", "gpu"]


class ManifestError(ValueError):
    """A model folder that cannot be served; the message says how to fix it."""


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class InputSpec(_Model):
    """What the artifact's input tensor holds."""

    name: str = "images"
    layout: Literal["NCHW"] = "NCHW"
    dtype: Literal["float32", "float16"] = "float32"
    color: Literal["RGB"] = "RGB"
    scale: float = 1 / 255.0  # uint8 pixel * scale
    # "letterbox": resize keeping aspect ratio to fit imgsz, pad with pad_value
    #   (Ultralytics). "rcnn": torchvision's GeneralizedRCNNTransform on the
    #   host: normalise with mean/std, resize to min_size/max_size, zero-pad to
    #   a multiple of stride; the graph also takes each image's resized and
    #   original (h, w).
    resize: Literal["letterbox", "rcnn"]
    imgsz: int | None = None  # letterbox target (the longer side)
    # letterbox to the minimal stride-multiple rectangle (as YOLO.predict does)
    # instead of the full square: input height/width then vary per image.
    rect: bool = False
    stride: int = 32
    pad_value: int = 114
    min_size: int | None = None  # torchvision transform
    max_size: int | None = None
    mean: tuple[float, float, float] | None = None
    std: tuple[float, float, float] | None = None


class OutputSpec(_Model):
    """What the artifact's outputs hold."""

    # "yolo_raw": one tensor [N, 4 + nc, anchors], boxes as cx, cy, w, h in
    #   input pixels, class scores after sigmoid; NMS is the runtime's.
    # "fasterrcnn": padded per-image detections: boxes [N, K, 4] xyxy in
    #   original pixels, scores [N, K], labels [N, K] int64, num_detections [N].
    kind: Literal["yolo_raw", "fasterrcnn"]
    names: list[str]
    min_score: float = 0.0  # scores below this never leave the graph


class BatchSpec(_Model):
    min: int = 1
    opt: int = 1
    max: int = 1
    dynamic: bool = False
    note: str = ""


class Parity(_Model):
    """How closely the artifact reproduces its source model (export-time check)."""

    images: int
    source_boxes: int
    matched_share: float  # source boxes matched by an artifact box, same class, IoU >= iou
    iou: float = 0.99
    max_box_diff_px: float
    max_score_diff: float
    threshold: float  # matched_share required to pass
    conf: float
    passed: bool


class SourceSpec(_Model):
    file: str  # copied into the export folder, for the PyTorch engine
    sha256: str
    kind: Literal["ultralytics", "torchvision_state_dict", "torchvision_random_init"]


class ProgramFile(_Model):
    """The model as a ``torch.export`` program (``.pt2``): loads with plain torch, no Ultralytics.

    What the compiled engine is built from on the pod, and what
    ``benchmarks/gpu_check.py`` runs where Ultralytics is not installed.
    """

    file: str
    sha256: str
    torch_version: str  # the torch that exported it
    dynamic_batch_max: int  # the largest batch the program's dynamic axis allows
    max_abs_diff: float  # largest raw-output difference vs the source model at export time


class PendingBuild(_Model):
    """A build step the export left for the target pod (it needs that pod's GPU), and why."""

    step: Literal["tensorrt", "aoti"]
    reason: str
    command: str  # what to run inside the pod


class Kernels(_Model):
    """The node types onnxruntime executes for an artifact: its optimized graph on the machine that exported it.

    A QDQ graph can run on int8 kernels (``QLinearConv``, ``QGemm``, ...) or be
    dequantized back to float by an execution provider that cannot fuse it; the
    counts say which happened.
    """

    provider: str = "CPUExecutionProvider"
    ops: dict[str, int]  # op type -> nodes of that type in the optimized graph
    int8_compute: int  # convolutions and matrix products on int8 kernels
    float_compute: int  # convolutions and matrix products left in float
    int8_share: float  # int8_compute / (int8_compute + float_compute)


class Agreement(_Model):
    """How closely a variant reproduces the exact artifact, on held-out images (no labels needed)."""

    images: int
    source: str  # which images
    conf: float  # the score threshold of the boxes compared (the model's default)
    iou: float = 0.9
    reference_boxes: int  # boxes of the exact artifact at ``conf``
    found_share: float  # of those, the share the variant finds: same class, IoU >= iou
    map50_95: float  # the variant's boxes scored against the exact artifact's boxes taken as ground truth
    map50: float


class ValFigures(_Model):
    """mAP of the exact artifact and of the variant on labelled images (``--val``)."""

    source: str
    images: int
    objects: int
    reference_map50_95: float  # the exact artifact (fp32)
    reference_map50: float
    map50_95: float  # the variant
    map50: float
    drop: float  # reference_map50_95 - map50_95


class Gate(_Model):
    """The accuracy gate a variant passed (or not) at export; ``precision: auto`` only runs variants that passed."""

    calibration: str  # what calibrated the variant
    calibration_images: int
    agreement: Agreement
    val: ValFigures | None = None
    basis: Literal["val", "agreement"]  # what decided: the mAP drop on labelled images, or agreement alone
    max_map_drop: float
    min_found_share: float
    passed: bool
    reason: str  # one line: why it passed or failed


class Variant(_Model):
    """Another artifact of the same model in the same folder (e.g. int8), with the figures that allow serving it.

    The manifest's own artifact is the exact one (parity-checked against the
    source model); a variant is served only when asked for (``precision``) and
    when its gate passed.
    """

    name: str  # "int8-cpu", "int8-trt", "int8-trt-engine"
    precision: Precision
    format: Format
    artifact: str
    artifact_sha256: str
    target: Target  # where it runs fast
    encoding: str  # what the artifact holds, in a line
    float_nodes: list[str] = Field(default_factory=list)  # what was kept in float, each with why
    kernels: Kernels | None = None
    gate: Gate | None = None
    gpu_arch: str | None = None  # TensorRT engines
    tensorrt_version: str | None = None
    batch: BatchSpec | None = None  # when it differs from the manifest's (an engine's profile)
    built_from: str | None = None  # the variant an engine was built from


class Manifest(_Model):
    schema_version: int = SCHEMA_VERSION
    name: str
    family: Family
    arch: str
    labels: dict[int, str]  # id as the artifact outputs it -> name (no background)
    format: Format
    artifact: str
    artifact_sha256: str
    precision: Precision = "fp32"
    opset: int | None = None
    pod: str = "regular"
    gpu_arch: str | None = None  # "sm_75", for TensorRT engines
    tensorrt_version: str | None = None
    torch_version: str | None = None  # for "aoti" packages: the torch that built (and alone loads) it
    input: InputSpec
    output: OutputSpec
    batch: BatchSpec
    source: SourceSpec
    defaults: dict[str, float] = Field(default_factory=lambda: {"conf": 0.25, "iou": 0.45, "max_det": 300})
    parity: Parity | None = None
    program: ProgramFile | None = None
    pending: list[PendingBuild] = Field(default_factory=list)
    # Other artifacts of the same model (int8, TensorRT engines), each with its gate;
    # manifests written before variants existed have none and load unchanged.
    variants: list[Variant] = Field(default_factory=list)
    versions: dict[str, str] = Field(default_factory=dict)
    created_at: str = ""


def exact_variant_name(manifest: Manifest) -> str:
    """The name the manifest's own artifact goes by among variants: "fp32", or "fp16-trt" for a TensorRT engine."""
    return manifest.precision if manifest.format == "onnx" else f"{manifest.precision}-{'trt' if manifest.format == 'tensorrt' else manifest.format}"


def variant_manifest(manifest: Manifest, variant: Variant) -> Manifest:
    """The manifest as if ``variant`` were the folder's artifact: what engines and the detector load."""
    update = {
        "artifact": variant.artifact,
        "artifact_sha256": variant.artifact_sha256,
        "precision": variant.precision,
        "format": variant.format,
        "gpu_arch": variant.gpu_arch if variant.format == "tensorrt" else manifest.gpu_arch,
        "tensorrt_version": variant.tensorrt_version if variant.format == "tensorrt" else manifest.tensorrt_version,
        "variants": [],
    }
    if variant.batch is not None:
        update["batch"] = variant.batch
    return manifest.model_copy(update=update)


def replace_variant(manifest: Manifest, variant: Variant) -> Manifest:
    """The manifest with ``variant`` added, or put in place of the one of the same name."""
    kept = [v for v in manifest.variants if v.name != variant.name]
    return manifest.model_copy(update={"variants": [*kept, variant]})


def sha256_file(path: str | Path, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def read_manifest(folder: str | Path) -> Manifest:
    """Read and validate ``folder/manifest.json``."""
    folder = Path(folder)
    path = folder / MANIFEST_NAME
    if not path.is_file():
        raise ManifestError(
            f"{folder} has no {MANIFEST_NAME}: pass a folder written by "
            f"`detserve export --out {folder} ...`"
        )
    try:
        manifest = Manifest.model_validate_json(path.read_text())
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first["loc"]) or "(root)"
        raise ManifestError(f"{path} is not a valid detserve manifest: {where}: {first['msg']}") from None
    if manifest.schema_version != SCHEMA_VERSION:
        raise ManifestError(
            f"{path} has schema_version {manifest.schema_version}; this detserve reads "
            f"{SCHEMA_VERSION}. Re-export the model."
        )
    return manifest


def write_manifest(folder: str | Path, manifest: Manifest) -> Path:
    path = Path(folder) / MANIFEST_NAME
    path.write_text(manifest.model_dump_json(indent=2) + "\n")
    return path


def verify_artifact(folder: str | Path, manifest: Manifest, which: Literal["artifact", "source"] = "artifact") -> Path:
    """Return the artifact's path after checking its sha256 against the manifest."""
    name, expected = (
        (manifest.artifact, manifest.artifact_sha256) if which == "artifact" else (manifest.source.file, manifest.source.sha256)
    )
    path = Path(folder) / name
    if not path.is_file():
        raise ManifestError(f"{path} is missing: the manifest names it as the {which}. Re-export the model.")
    actual = sha256_file(path)
    if actual != expected:
        raise ManifestError(
            f"{path} does not match its manifest (sha256 {actual[:12]}... != {expected[:12]}...): "
            "the file was changed after export. Re-export the model rather than editing it."
        )
    return path
