"""torchvision Faster R-CNN -> ONNX (legacy TorchScript exporter).

The graph keeps torchvision's own transform (normalise, resize to min/max
size) and postprocess (boxes scaled back to the input image), so its input is
one 0-1 RGB image ``[1, 3, H, W]`` of any size and its outputs are that image's
boxes, labels and scores. torchvision's export unrolls the batch at trace time
(pytorch/vision#8937), so this graph takes one image per call; the manifest
says so (``batch.max = 1``) and the runtime loops.
"""

from __future__ import annotations

import contextlib
import io
import shutil
import warnings
from pathlib import Path

import torch

from detserve.manifest import BatchSpec, InputSpec, Manifest, OutputSpec, SourceSpec, sha256_file
from detserve.pods import ExportPlan, Pod
from detserve.progress import step
from detserve.sources import build_fasterrcnn, read_fasterrcnn_checkpoint

from export.pipeline import ExportError, ExportRequest

#: torchvision's box_score_thresh: boxes below it never leave the graph. A
#: threshold of 0 makes ONNX NonMaxSuppression take seconds (90k candidates).
MIN_SCORE = 0.05


class _SingleImage(torch.nn.Module):
    """NCHW (N=1) in, the image's (boxes, labels, scores) out: the ONNX-facing signature."""

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.model = model

    def forward(self, images: torch.Tensor):
        result = self.model([images[0]])[0]
        return result["boxes"], result["labels"], result["scores"]


def export_fasterrcnn(req: ExportRequest, out: Path, pod: Pod, plan: ExportPlan) -> Manifest:
    source = out / "source.pth"
    with step("Loading Faster R-CNN weights", req.quiet):
        ckpt = read_fasterrcnn_checkpoint(Path(req.weights) if req.weights else None, req.arch)
        if req.arch and ckpt.arch != req.arch:
            raise ExportError(f"--arch {req.arch} does not match the checkpoint's arch {ckpt.arch}")
        labels = req.labels or ckpt.labels
        num_classes = ckpt.num_classes
        if labels is None:
            raise ExportError("the checkpoint names no labels: pass --labels FILE (one class name per line, no background)")
        if num_classes is None:
            num_classes = len(labels) + 1
        if len(labels) != num_classes - 1:
            raise ExportError(
                f"--labels has {len(labels)} names but the box predictor has {num_classes} classes "
                f"({num_classes - 1} + background); give one name per non-background class"
            )
        min_size = req.imgsz or ckpt.min_size
        max_size = ckpt.max_size if ckpt.max_size and (min_size or 0) <= ckpt.max_size else None
        model = build_fasterrcnn(
            ckpt.arch, num_classes, state_dict=ckpt.state_dict, min_size=min_size, max_size=max_size, box_score_thresh=MIN_SCORE
        )
        transform = model.transform
        min_size, max_size = int(transform.min_size[0]), int(transform.max_size)
        # The source file travels with the artifact: the torch engine and the
        # parity check rebuild exactly this model from it.
        if req.weights:
            shutil.copyfile(req.weights, source)
        else:
            torch.save({"arch": ckpt.arch, "labels": labels, "min_size": min_size, "max_size": max_size, "state_dict": model.state_dict()}, source)
    artifact = out / "model.onnx"
    with step(f"Exporting ONNX (opset {req.opset}, dynamic height/width, one image per call)", req.quiet):
        example = torch.rand(1, 3, min_size, int(min_size * 4 / 3))
        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
            warnings.simplefilter("ignore")
            torch.onnx.export(
                _SingleImage(model),
                (example,),
                str(artifact),
                dynamo=False,
                opset_version=req.opset,
                input_names=["images"],
                output_names=["boxes", "labels", "scores"],
                dynamic_axes={"images": {2: "height", 3: "width"}, "boxes": {0: "detections"}, "labels": {0: "detections"}, "scores": {0: "detections"}},
            )
    with step("Simplifying the graph (onnxslim)", req.quiet):
        _slim(artifact)
    return Manifest(
        name=req.name or f"{ckpt.arch}",
        family="fasterrcnn",
        arch=ckpt.arch,
        labels={i + 1: str(name) for i, name in enumerate(labels)},  # 0 is background
        format="onnx",
        artifact=artifact.name,
        artifact_sha256="",
        precision=plan.precision,
        opset=req.opset,
        pod=pod.name,
        gpu_arch=pod.sm,
        input=InputSpec(
            resize="in_graph",
            min_size=min_size,
            max_size=max_size,
            mean=tuple(float(v) for v in transform.image_mean),
            std=tuple(float(v) for v in transform.image_std),
        ),
        output=OutputSpec(kind="fasterrcnn", names=["boxes", "labels", "scores"], min_score=MIN_SCORE),
        batch=BatchSpec(
            min=1, opt=1, max=1, dynamic=False,
            note="torchvision's export unrolls the batch (pytorch/vision#8937): one image per engine call",
        ),
        source=SourceSpec(
            file=source.name, sha256=sha256_file(source), kind="torchvision_state_dict" if req.weights else "torchvision_random_init"
        ),
        defaults={"conf": 0.5, "iou": 0.5, "max_det": 100},
    )


def _slim(path: Path) -> None:
    """Fold constants and drop dead nodes with onnxslim; keep the original if it fails."""
    try:
        import onnxslim

        with contextlib.redirect_stdout(io.StringIO()):
            slimmed = onnxslim.slim(str(path))
        import onnx

        onnx.save(slimmed, str(path))
    except Exception as exc:  # slimming is an optimisation, never a reason to fail
        from detserve.progress import console

        console.print(f"[yellow]note:[/] onnxslim could not simplify the graph ({exc}); kept it as exported")
