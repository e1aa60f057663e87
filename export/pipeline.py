"""weights -> artifact + manifest, verified against the source model.

``export_model`` is the whole export stage: load the source weights, write the
ONNX graph (and, for GPU pods, a TensorRT engine), check that the artifact
gives the source model's boxes, and write ``manifest.json`` with the parity
figures. Everything a user can get wrong raises :class:`ExportError` with one
line that says what to do.
"""

from __future__ import annotations

import datetime as dt
import importlib.metadata
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np

from detserve.runtime.manifest import MANIFEST_NAME, Manifest, PendingBuild, sha256_file, write_manifest
from detserve.runtime.pods import export_plan, get_pod
from detserve.runtime.progress import step
from detserve.runtime.sources import SourceError

Family = Literal["yolo", "fasterrcnn"]


#: Score threshold of the parity check: low enough that a trained model shows
#: many boxes to compare, high enough to stay clear of the graph's own floor.
PARITY_CONF = 0.25


class ExportError(ValueError):
    """An export that cannot go ahead; the message says why and what to do."""


@dataclass
class ExportRequest:
    """What ``detserve export`` was asked to do (CLI flags, one to one)."""

    model: Family
    weights: Path | None
    out: Path
    arch: str | None = None
    labels: list[str] | None = None
    imgsz: int | None = None
    format: Literal["onnx", "tensorrt", "aoti"] = "onnx"
    pod: str = "regular"
    precision: Literal["fp32", "fp16", "int8"] | None = None  # None: the pod's preference; int8: also int8 variants
    max_batch: int | None = None
    opset: int = 17
    parity_threshold: float = 0.99
    parity_conf: float | None = None
    parity_images: list[np.ndarray] | None = None  # default: photos + generated scenes
    force: bool = False
    name: str | None = None
    quiet: bool = False
    extra: dict = field(default_factory=dict)
    # --precision int8 (export/quantize.py, export/gate.py)
    calibration: Path | None = None  # --calibration: a folder of images like those to serve
    val: Path | None = None  # --val: labelled images (YOLO txt or COCO json)
    max_map_drop: float = 0.005  # --max-map-drop: the most mAP50-95 int8 may lose on --val
    min_found_share: float = 0.9  # without --val: the least share of the fp32 boxes int8 must find
    calibration_images: list[np.ndarray] | None = None  # instead of --calibration (tests, default models)
    agreement_images: list[np.ndarray] | None = None  # instead of the held-out parity images
    val_images: list | None = None  # instead of --val: training.datasets.LabelledImage
    val_source: str | None = None  # what val_images are, for the manifest


def read_labels(path: Path) -> list[str]:
    """Labels from a text file (one per line) or JSON (a list, or {id: name})."""
    import json

    if not path.is_file():
        raise ExportError(f"no labels file at {path}")
    text = path.read_text().strip()
    if path.suffix == ".json":
        data = json.loads(text)
        if isinstance(data, dict):
            return [data[k] for k in sorted(data, key=lambda k: int(k))]
        return [str(x) for x in data]
    labels = [line.strip() for line in text.splitlines() if line.strip()]
    if not labels:
        raise ExportError(f"{path} has no labels (one per line)")
    return labels


def onnx_fields(req: ExportRequest, pod, plan, artifact: Path) -> dict:
    """The manifest fields every ONNX export fills the same way (sha256 and versions come last)."""
    return dict(
        format="onnx", artifact=artifact.name, artifact_sha256="", precision=plan.precision,
        opset=req.opset, pod=pod.name, gpu_arch=pod.sm,
    )  # fmt: skip


def prepare_out_dir(out: Path, force: bool) -> None:
    if out.exists():
        if not force:
            raise ExportError(f"{out} already exists; pass --force to replace it, or choose another --out")
        if not out.is_dir():
            raise ExportError(f"{out} exists and is not a folder")
        if any(out.iterdir()) and not (out / MANIFEST_NAME).exists():
            # --force replaces an earlier export, never an unrelated folder.
            raise ExportError(f"{out} is not empty and holds no {MANIFEST_NAME}; refusing to delete it even with --force")
        shutil.rmtree(out)
    out.mkdir(parents=True)


def library_versions() -> dict[str, str]:
    versions = {}
    for name in ("detserve", "torch", "torchvision", "ultralytics", "onnx", "onnxruntime", "onnxslim", "tensorrt"):
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            pass
    return versions


def export_model(req: ExportRequest) -> Manifest:
    """Run the export stage; returns the manifest written to ``req.out``."""
    try:
        pod = get_pod(req.pod)
        plan = export_plan(req.pod, req.format, req.precision)
    except ValueError as exc:
        raise ExportError(str(exc)) from None
    if plan.reason and not req.quiet:
        from detserve.runtime.progress import console

        console.print(f"[yellow]note:[/] {plan.reason}")
    if req.weights is not None and not Path(req.weights).exists() and Path(req.weights).suffix not in (".yaml", ".yml"):
        raise ExportError(f"no weights file at {req.weights}")
    if req.max_batch is not None and req.max_batch < 1:
        raise ExportError(f"--max-batch must be at least 1, got {req.max_batch}")
    if not 0.0 <= req.parity_threshold <= 1.0:
        raise ExportError(f"--parity-threshold must be between 0 and 1, got {req.parity_threshold}")
    if not plan.int8 and (req.calibration is not None or req.val is not None):
        raise ExportError("--calibration and --val are for --precision int8")
    for flag, folder in (("--calibration", req.calibration), ("--val", req.val)):
        if folder is not None and not Path(folder).is_dir():
            raise ExportError(f"{flag} {folder} is not a folder")
    out = Path(req.out)
    prepare_out_dir(out, req.force)
    try:
        if req.model == "yolo":
            from detserve.export.yolo import export_yolo as family_export
        elif req.model == "fasterrcnn":
            from detserve.export.fasterrcnn import export_fasterrcnn as family_export
        else:
            raise ExportError(f"unknown model family {req.model!r}; choose yolo or fasterrcnn")
        draft = family_export(req, out, pod, plan)
    except SourceError as exc:
        shutil.rmtree(out, ignore_errors=True)
        raise ExportError(str(exc)) from None
    except ExportError:
        shutil.rmtree(out, ignore_errors=True)
        raise
    manifest = draft.model_copy(
        update={
            "artifact_sha256": sha256_file(out / draft.artifact),
            "versions": library_versions(),
            "created_at": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        }
    )
    write_manifest(out, manifest)
    manifest = _check_parity(req, out, manifest)
    if plan.int8:
        from detserve.export.quantize import add_int8_variants

        manifest = add_int8_variants(req, out, manifest, target=pod.kind)
    if pod.kind == "gpu":
        manifest = _record_pending(req, out, manifest, plan)
    if plan.format == "tensorrt":
        from detserve.export.tensorrt import build_for_manifest

        manifest = build_for_manifest(req, out, manifest, plan)
    elif plan.format == "aoti":
        from detserve.export.compiled import build_for_manifest as build_compiled

        manifest = build_compiled(req, out, manifest, plan)
    return manifest


def gpu_only_steps(req: ExportRequest, manifest: Manifest, plan) -> list[PendingBuild]:
    """The GPU-only builds this export leaves for the pod (TensorRT engine, compiled package), each with why."""
    from detserve.runtime.engines import tensorrt as trt_lookup

    pod = plan.pod
    sm_here = trt_lookup.current_gpu_sm()
    if sm_here is None:
        machine = "no CUDA GPU is visible on this machine"
    elif sm_here != pod.sm:
        machine = f"this machine's GPU is {sm_here}, the {pod.name} pod's is {pod.sm}"
    else:
        machine = ""
    args = f"--model {manifest.family} --pod {pod.name} --out <folder>" + (" --precision int8" if plan.int8 else "")
    steps = []
    if plan.format != "tensorrt":
        if not pod.tensorrt_supported:
            reason = f"the pinned TensorRT cannot target this pod's GPU: {pod.note}"
        else:
            why = [w for w in (machine, "TensorRT is not installed here" if trt_lookup.installed_tensorrt_version() is None else "") if w]
            reason = (
                f"a TensorRT engine only loads on the GPU architecture ({pod.sm}) and TensorRT version that built it, so it "
                f"is built on the pod's GPU; here {' and '.join(why) if why else '--format onnx was asked for'}"
            )
        steps.append(PendingBuild(step="tensorrt", reason=reason, command=f"detserve export {args} --format tensorrt (inside the pod)"))
    if plan.format != "aoti" and manifest.program is not None:
        reason = (
            f"an AOTInductor package is compiled for one GPU architecture ({pod.sm}) and one torch version, on that GPU; "
            f"here {machine or '--format aoti was not asked for'}"
        )
        steps.append(PendingBuild(step="aoti", reason=reason, command=f"detserve export {args} --format aoti (inside the pod)"))
    return steps


def _record_pending(req: ExportRequest, out: Path, manifest: Manifest, plan) -> Manifest:
    pending = gpu_only_steps(req, manifest, plan)
    manifest = manifest.model_copy(update={"pending": pending})
    write_manifest(out, manifest)
    if pending and not req.quiet:
        from detserve.runtime.progress import console

        for item in pending:
            console.print(f"[yellow]left for the pod:[/] {item.step}: {item.reason}. Run: {item.command}")
    return manifest


def _check_parity(req: ExportRequest, out: Path, manifest: Manifest) -> Manifest:
    """Run source and artifact on the same images; record the figures; fail below threshold."""
    from detserve.runtime.detector import Detector
    from detserve.runtime.engines import load_engine
    from detserve.export.parity import measure
    from detserve.export.reference import parity_images, source_reference

    conf = req.parity_conf if req.parity_conf is not None else PARITY_CONF
    images = req.parity_images if req.parity_images is not None else parity_images()
    with step("Loading the exported model and its source", req.quiet):
        artifact = Detector(out, manifest=manifest, engine=load_engine(out, backend="onnxruntime", device="cpu", manifest=manifest))
        params = artifact.params(conf=conf)
        # The reference is the source library's own inference (Ultralytics predict / torchvision eval).
        reference = source_reference(out, manifest, conf=conf, iou=params.iou)
    parity = measure(
        lambda image, p: artifact.detect([image], p)[0], reference, images, params,
        threshold=req.parity_threshold, what="ONNX", quiet=req.quiet,
    )  # fmt: skip
    manifest = manifest.model_copy(update={"parity": parity})
    write_manifest(out, manifest)
    if not parity.passed:
        raise ExportError(
            f"parity check failed: the artifact matched {parity.matched_share:.1%} of the source model's boxes, "
            f"below --parity-threshold {req.parity_threshold:.2f} (figures kept in {out / MANIFEST_NAME})"
        )
    return manifest

