"""Ultralytics YOLO (v8, 11, ...) -> ONNX with a dynamic batch axis, NMS left to the runtime.

Ultralytics' own ``nms=True`` export drops detections for images past its fixed
export batch, so the graph ends at the raw head output ``[N, 4 + nc, anchors]``
and the runtime core does class-aware NMS for the whole batch.
"""

from __future__ import annotations

import contextlib
import io
import shutil
from pathlib import Path

from detserve.runtime.manifest import BatchSpec, InputSpec, Manifest, OutputSpec, SourceSpec, sha256_file
from detserve.runtime.pods import ExportPlan, Pod
from detserve.runtime.progress import step
from detserve.runtime.sources import load_yolo

from detserve.export.pipeline import ExportError, ExportRequest, onnx_fields


def export_yolo(req: ExportRequest, out: Path, pod: Pod, plan: ExportPlan) -> Manifest:
    source = out / "source.pt"
    with step("Loading YOLO weights", req.quiet):
        weights = Path(req.weights) if req.weights else Path("yolo11n.yaml")
        model = load_yolo(weights)
        if weights.suffix == ".pt":
            shutil.copyfile(weights, source)
            kind = "ultralytics"
        else:  # a config: random init, saved so every engine sees the same weights
            model.save(source)
            kind = "ultralytics"
        model = load_yolo(source)
        names = dict(model.names)
        if req.labels is not None:
            if len(req.labels) != len(names):
                raise ExportError(
                    f"--labels has {len(req.labels)} names but the model's head has {len(names)} classes"
                )
            names = dict(enumerate(req.labels))
        train_args = getattr(model, "ckpt", {}) or {}
        trained_imgsz = (train_args.get("train_args") or {}).get("imgsz")
        imgsz = int(req.imgsz or trained_imgsz or 640)
        stride = int(max(model.model.stride))
        if imgsz % stride:
            raise ExportError(f"--imgsz {imgsz} is not a multiple of the model's stride {stride}")
    max_batch = req.max_batch or pod.max_batch
    with step(f"Exporting ONNX (opset {req.opset}, dynamic batch, imgsz {imgsz})", req.quiet):
        # Ultralytics prints its own export log; keep ours readable.
        with contextlib.redirect_stdout(io.StringIO()):
            written = model.export(
                format="onnx", dynamic=True, simplify=True, imgsz=imgsz, opset=req.opset, batch=1, device="cpu", nms=False, half=False
            )
        artifact = out / "model.onnx"
        Path(written).rename(artifact)
    # GPU pods: the full imgsz square, so images of any size share one fixed-shape
    # batch (as Ultralytics does for ONNX/TensorRT models); parity is then measured
    # against Ultralytics' predict with rect=False, the same square input.
    square = pod.kind == "gpu"
    program = None
    if square:
        from detserve.export.program import export_program

        with step("Exporting the torch program (model.pt2, for the compiled engine and the GPU check)", req.quiet):
            program = export_program(model, out, imgsz=imgsz, max_batch=max_batch)
        model = load_yolo(source)  # fuse() above changed the module in place
    return Manifest(
        name=req.name or f"{weights.stem}-yolo",
        family="yolo",
        arch=str((model.model.yaml or {}).get("yaml_file", weights.name)),
        labels={int(k): str(v) for k, v in names.items()},
        **onnx_fields(req, pod, plan, artifact),
        # rect (CPU pods): each image letterboxed to its own stride-multiple rectangle,
        # as YOLO.predict does, so boxes match Ultralytics exactly; the graph's
        # height and width are dynamic, and the runtime batches same-shape images.
        input=InputSpec(resize="letterbox", imgsz=imgsz, stride=stride, pad_value=114, rect=not square),
        program=program,
        output=OutputSpec(kind="yolo_raw", names=["output0"]),
        batch=BatchSpec(min=1, opt=pod.opt_batch, max=max_batch, dynamic=True, note="one graph for any batch size up to max"),
        source=SourceSpec(file=source.name, sha256=sha256_file(source), kind=kind),
        defaults={"conf": 0.25, "iou": 0.45, "max_det": 300},
    )
