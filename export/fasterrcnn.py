"""torchvision Faster R-CNN -> ONE ONNX graph for a dynamic batch of images.

torchvision's own export unrolls the batch at trace time (pytorch/vision#8937)
and loops over images in Python. detserve exports
:class:`detserve.runtime.batched_rcnn.BatchedFasterRCNN` instead: the same modules and
weights, every per-image step re-expressed as batched tensor ops, so one graph
takes ``[N, 3, H, W]`` (N, H, W dynamic) and returns padded per-image
detections. The runtime does torchvision's normalise/resize/pad on the host
(``detserve.runtime.preprocess.rcnn_resize``, the same torch ops in the same order), so
the graph's input is bit-identical to ``GeneralizedRCNNTransform``'s.
"""

from __future__ import annotations

import contextlib
import io
import shutil
import warnings
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from detserve.runtime.batched_rcnn import OUTPUT_NAMES, INPUT_NAMES, BatchedFasterRCNN
from detserve.runtime.manifest import BatchSpec, InputSpec, Manifest, OutputSpec, SourceSpec, sha256_file
from detserve.runtime.pods import ExportPlan, Pod
from detserve.runtime.progress import step
from detserve.runtime.sources import build_fasterrcnn, read_fasterrcnn_checkpoint

from detserve.export.pipeline import ExportError, ExportRequest, onnx_fields

#: torchvision's box_score_thresh: boxes below it never leave the graph. A
#: threshold of 0 makes ONNX NonMaxSuppression take seconds (90k candidates).
MIN_SCORE = 0.05


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
    with step(f"Exporting ONNX (opset {req.opset}, one graph for a dynamic batch, dynamic height/width)", req.quiet):
        export_batched(model, artifact, opset=req.opset)
    max_batch = req.max_batch or pod.max_batch
    return Manifest(
        name=req.name or f"{ckpt.arch}",
        family="fasterrcnn",
        arch=ckpt.arch,
        labels={i + 1: str(name) for i, name in enumerate(labels)},  # 0 is background
        **onnx_fields(req, pod, plan, artifact),
        input=InputSpec(
            resize="rcnn",
            min_size=min_size,
            max_size=max_size,
            stride=int(transform.size_divisible),
            mean=tuple(float(v) for v in transform.image_mean),
            std=tuple(float(v) for v in transform.image_std),
        ),
        output=OutputSpec(kind="fasterrcnn", names=list(OUTPUT_NAMES), min_score=MIN_SCORE),
        batch=BatchSpec(
            min=1, opt=min(pod.opt_batch, max_batch), max=max_batch, dynamic=True,
            note="one graph for any batch; the runtime batches images that pad to the same size, "
            "so each image gets the boxes torchvision gives it alone",
        ),
        source=SourceSpec(
            file=source.name, sha256=sha256_file(source), kind="torchvision_state_dict" if req.weights else "torchvision_random_init"
        ),
        defaults={"conf": 0.5, "iou": 0.5, "max_det": 100},
    )


def export_batched(
    model: torch.nn.Module,
    out_path: str | Path,
    opset: int = 17,
    *,
    trace_sizes: Sequence[tuple[int, int]] = ((240, 320), (300, 200)),
) -> Path:
    """Export ``model`` (a torchvision FasterRCNN or a :class:`BatchedFasterRCNN`) to one ONNX graph.

    Inputs ``images [N, 3, H, W]`` float32 (see :func:`resize_and_batch`),
    ``image_sizes [N, 2]`` int64, ``original_sizes [N, 2]`` int64; outputs
    ``boxes [N, K, 4]``, ``scores [N, K]``, ``labels [N, K]`` int64,
    ``num_detections [N]`` int64. N, H, W are dynamic: traced with two images
    of different original sizes (``trace_sizes``) so no size is baked in.
    """
    wrapped = model if isinstance(model, BatchedFasterRCNN) else BatchedFasterRCNN(model)
    wrapped.eval()
    rng = np.random.default_rng(0)
    example = [rng.integers(0, 256, (h, w, 3), dtype=np.uint8) for h, w in trace_sizes]
    batch, sizes, originals = wrapped.prepare(example)
    args = (torch.from_numpy(batch), torch.from_numpy(sizes), torch.from_numpy(originals))
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    with torch.no_grad(), warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")
        torch.onnx.export(
            wrapped,
            args,
            str(out_path),
            dynamo=False,
            opset_version=opset,
            input_names=INPUT_NAMES,
            output_names=OUTPUT_NAMES,
            dynamic_axes={
                "images": {0: "batch", 2: "height", 3: "width"},
                "image_sizes": {0: "batch"},
                "original_sizes": {0: "batch"},
                "boxes": {0: "batch"},
                "scores": {0: "batch"},
                "labels": {0: "batch"},
                "num_detections": {0: "batch"},
            },
        )
    _fix_output_shapes(out_path, wrapped.detections_per_img)
    return out_path


def _fix_output_shapes(path: Path, k: int) -> None:
    """Write the static K into the outputs' declared shapes (the tracer leaves it symbolic)."""
    import onnx

    model = onnx.load(str(path))
    for out in model.graph.output:
        dims = out.type.tensor_type.shape.dim
        if out.name != "num_detections" and len(dims) >= 2:
            dims[1].Clear()
            dims[1].dim_value = k
    onnx.checker.check_model(model)
    onnx.save(model, str(path))
