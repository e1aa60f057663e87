"""The source YOLO as a ``torch.export`` program (``model.pt2``): plain torch, no Ultralytics.

GPU pods get it beside the ONNX graph. It is what the compiled engine
(AOTInductor, ``export/compiled.py``) is built from inside the pod, and what
``benchmarks/gpu_check.py`` runs eager, under CUDA graphs and compiled on a GPU
machine that has torch but no Ultralytics. The fused eval model is exported in
fp32 with a dynamic batch axis and the square ``imgsz x imgsz`` input;
``torch.export.load(path).module()`` gives back a module whose forward returns
the raw head ``[N, 4 + nc, anchors]``, checked here against the source.
"""

from __future__ import annotations

import contextlib
import io
import warnings
from pathlib import Path

import torch

from detserve.runtime.manifest import ProgramFile, sha256_file

PROGRAM_NAME = "model.pt2"


class RawHead(torch.nn.Module):
    """Ultralytics' eval forward returns ``(raw, features)``; keep ``raw``."""

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.model(x)
        return out[0] if isinstance(out, (list, tuple)) else out


def export_program(yolo, out: Path, *, imgsz: int, max_batch: int) -> ProgramFile:
    """Write ``out/model.pt2`` from an Ultralytics ``YOLO``; returns its manifest record."""
    model = RawHead(yolo.model.fuse().float().eval())
    for p in model.parameters():
        p.requires_grad_(False)
    example = torch.rand(2, 3, imgsz, imgsz)  # batch 2: an example batch of 1 would be specialised
    batch = torch.export.Dim("batch", min=1, max=max(max_batch, 2))
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()), torch.inference_mode(False):
        # The Detect head caches anchors as plain attributes; torch.export warns and computes them in-graph.
        warnings.simplefilter("ignore")
        program = torch.export.export(model, (example,), dynamic_shapes={"x": {0: batch}}, strict=False)
    path = Path(out) / PROGRAM_NAME
    torch.export.save(program, path)
    with torch.inference_mode():
        expected = model(example)
        got = torch.export.load(path).module()(example)
    diff = float((expected - got).abs().max())
    return ProgramFile(
        file=path.name, sha256=sha256_file(path), torch_version=torch.__version__.split("+")[0],
        dynamic_batch_max=max(max_batch, 2), max_abs_diff=round(diff, 6),
    )  # fmt: skip
