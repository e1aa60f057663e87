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
Precision = Literal["fp32", "fp16"]


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
    versions: dict[str, str] = Field(default_factory=dict)
    created_at: str = ""


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
