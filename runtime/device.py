"""The device-resident YOLO path, in torch: uint8 pixels go up, final boxes come down.

    pack (square letterbox + normalise into a preallocated NCHW buffer)
      -> model (eager, CUDA graph per batch bucket, or a compiled package)
      -> yolo_nms_tensors (the runtime's one YOLO NMS, batched, on the device)
      -> unletterbox on the device, then one copy to the host

It runs wherever torch runs, so CI exercises every stage on the CPU; on a GPU
the same code keeps the float tensors on the device. The CPU path
(``preprocess`` -> engine -> ``postprocess``) stays the reference, and
``tests/test_device_path.py`` compares the two.

Why the square: on a GPU every image must share one fixed-shape batch, so the
letterbox is the full ``imgsz`` square (``letterbox(rect=False)``, as
Ultralytics does for ONNX/TensorRT models), never each image's own rectangle.
Why buckets: a batch of 5 runs as 8 (the rows past 5 are padding, their
outputs dropped), so only ``log2(max)`` shapes exist, each can have a CUDA
graph captured once, and a compiled engine meets no new shapes.

torch interpolation vs cv2: the resize is ``F.interpolate(bilinear,
align_corners=False)``, cv2's INTER_LINEAR sampling, rounded to uint8 as cv2
does; cv2 computes in 11-bit fixed point, so a pixel can differ by one grey
level. The tests measure that and compare boxes, not just pixels.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F

from detserve.runtime.postprocess import DetectParams, Detections, yolo_nms_tensors
from detserve.runtime.preprocess import Geometry, letterbox_layout

__all__ = ["CudaGraphs", "DeviceBatch", "DevicePath", "GraphsUnavailable", "bucket_for", "buckets", "device_boxes", "letterbox_into"]


# -- batch-size buckets --------------------------------------------------------


def buckets(max_batch: int) -> tuple[int, ...]:
    """``1, 2, 4, ...`` up to ``max_batch`` (which is always the last, power of two or not)."""
    if not (isinstance(max_batch, int) and max_batch >= 1):
        raise ValueError(f"max_batch must be a positive integer, got {max_batch!r}")
    sizes = []
    b = 1
    while b < max_batch:
        sizes.append(b)
        b *= 2
    sizes.append(max_batch)
    return tuple(sizes)


def bucket_for(n: int, sizes: Sequence[int]) -> int:
    """The smallest bucket that holds ``n`` images."""
    for size in sizes:
        if n <= size:
            return size
    raise ValueError(f"a batch of {n} is larger than the largest bucket {max(sizes)}; split it first")


# -- preprocessing on the device ----------------------------------------------


def letterbox_into(image: torch.Tensor, out: torch.Tensor, *, pad_value: int = 114, scale: float = 1 / 255.0) -> Geometry:
    """Square-letterbox one ``HxWx3`` uint8 image into ``out`` (``[3, S, S]``, float, on the image's device).

    The arithmetic is ``preprocess.letterbox_layout`` (Ultralytics' rounding);
    pixels are rounded to uint8 after the resize, as cv2 does, then scaled.
    """
    if image.ndim != 3 or image.shape[2] != 3 or image.dtype != torch.uint8:
        raise ValueError(f"expected an HxWx3 uint8 image tensor, got {tuple(image.shape)} {image.dtype}")
    size = out.shape[-1]
    h, w = int(image.shape[0]), int(image.shape[1])
    new_w, new_h, top, _, left, _ = letterbox_layout(h, w, size, rect=False)
    chw = image.permute(2, 0, 1)
    if (new_w, new_h) != (w, h):
        resized = F.interpolate(chw[None].float(), size=(new_h, new_w), mode="bilinear", align_corners=False)[0]
        chw = resized.round_().clamp_(0, 255)
    out.fill_(pad_value * scale)
    out[:, top : top + new_h, left : left + new_w].copy_(chw).mul_(scale)
    return Geometry(h, w, new_w / w, new_h / h, left, top)


@dataclass
class DeviceBatch:
    """A preallocated ``[max_batch, 3, imgsz, imgsz]`` input on one device; ``pack`` fills its first rows.

    The buffer never moves, so a bucket's input ``buffer[:bucket]`` has the same
    address every time: what a captured CUDA graph needs.
    """

    imgsz: int
    max_batch: int
    device: torch.device | str = "cpu"
    dtype: torch.dtype = torch.float32
    pad_value: int = 114
    scale: float = 1 / 255.0
    sizes: tuple[int, ...] = field(init=False)
    buffer: torch.Tensor = field(init=False)

    def __post_init__(self) -> None:
        self.sizes = buckets(self.max_batch)
        self.device = torch.device(self.device)
        self.buffer = torch.full((self.max_batch, 3, self.imgsz, self.imgsz), self.pad_value * self.scale, dtype=self.dtype, device=self.device)

    def pack(self, images: Sequence[torch.Tensor]) -> tuple[torch.Tensor, list[Geometry]]:
        """Letterbox ``images`` into the buffer; returns the bucket's input (padding rows included) and the geometries."""
        n = len(images)
        if n == 0:
            raise ValueError("pack needs at least one image")
        bucket = bucket_for(n, self.sizes)
        geometries = [
            letterbox_into(image.to(self.device, non_blocking=True), self.buffer[i], pad_value=self.pad_value, scale=self.scale)
            for i, image in enumerate(images)
        ]
        if bucket > n:  # padding rows: plain pad colour, their outputs are dropped
            self.buffer[n:bucket].fill_(self.pad_value * self.scale)
        return self.buffer[:bucket], geometries


# -- postprocessing on the device ----------------------------------------------


def device_boxes(raw: torch.Tensor, geometries: Sequence[Geometry], params: DetectParams | Sequence[DetectParams]) -> list[Detections]:
    """NMS and unletterbox on ``raw``'s device for the first ``len(geometries)`` rows; one copy to the host.

    Same results as ``postprocess.yolo_nms`` + ``unletterbox`` (the same NMS
    function; the same float32 arithmetic for the inverse letterbox).
    """
    n = len(geometries)
    per_image = [params] * n if isinstance(params, DetectParams) else list(params)
    if len(per_image) != n:
        raise ValueError(f"{len(per_image)} settings for {n} images")
    device = raw.device
    geo = torch.tensor([[g.gain_x, g.gain_y, g.pad_x, g.pad_y, g.orig_w, g.orig_h] for g in geometries], dtype=torch.float32, device=device)
    results = [Detections() for _ in range(n)]
    for setting in dict.fromkeys(per_image):  # usually one setting for the whole batch
        rows = [i for i, p in enumerate(per_image) if p == setting]
        part = raw[:n] if len(rows) == n else raw[torch.tensor(rows, device=device)]
        kept = yolo_nms_tensors(part, setting)
        if kept.images.numel() == 0:
            continue
        g = geo[torch.tensor(rows, device=device)][kept.images]
        boxes = kept.boxes.float().clone()
        boxes[:, [0, 2]] = ((boxes[:, [0, 2]] - g[:, 2:3]) / g[:, 0:1]).clamp(min=0).minimum(g[:, 4:5])
        boxes[:, [1, 3]] = ((boxes[:, [1, 3]] - g[:, 3:4]) / g[:, 1:2]).clamp(min=0).minimum(g[:, 5:6])
        # One device -> host copy for the whole batch.
        host = torch.cat([boxes, kept.scores.float()[:, None], kept.class_ids.float()[:, None], kept.images.float()[:, None]], 1).cpu().numpy()
        image_of = host[:, 6].astype(np.int64)
        for local in np.unique(image_of):
            sel = image_of == local
            results[rows[local]] = Detections(host[sel, :4].copy(), host[sel, 4].copy(), host[sel, 5].astype(np.int64))
    return results


# -- CUDA graphs per bucket -------------------------------------------------------


class GraphsUnavailable(RuntimeError):
    """CUDA graphs cannot be captured here; the message says why."""


def graphs_unavailable_reason(device: torch.device | str) -> str | None:
    """None when CUDA graphs can be captured on ``device``, else why not."""
    device = torch.device(device)
    if device.type != "cuda":
        return f"CUDA graphs need a CUDA device; this path runs on {device.type}"
    if not torch.cuda.is_available():
        return "CUDA graphs need a CUDA GPU, and torch.cuda.is_available() is False"
    return None


def capture_cuda_graph(model: Callable[[torch.Tensor], torch.Tensor], static_input: torch.Tensor, warmup: int = 3):
    """Capture ``model(static_input)``; returns ``(replay, static_output)``. Warm-up runs on a side stream, as torch's docs say."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(warmup):
            model(static_input)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_output = model(static_input)
    return graph.replay, static_output


class CudaGraphs:
    """One captured graph per batch bucket, over a :class:`DeviceBatch`'s fixed buffer.

    ``capture`` is :func:`capture_cuda_graph` on a GPU; tests pass a stand-in to
    check the bookkeeping (one capture per bucket, inputs are views of the one
    buffer, outputs are the captured ones) on the CPU.
    """

    def __init__(self, model: Callable[[torch.Tensor], torch.Tensor], batch: DeviceBatch, *, capture=None):
        if capture is None:
            reason = graphs_unavailable_reason(batch.device)
            if reason:
                raise GraphsUnavailable(reason)
            capture = capture_cuda_graph
        self.model, self.batch, self._capture = model, batch, capture
        self.graphs: dict[int, tuple[Callable[[], None], torch.Tensor]] = {}
        self.captures = 0
        self.replays = 0

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        bucket = x.shape[0]
        if bucket not in self.batch.sizes or x.data_ptr() != self.batch.buffer.data_ptr():
            raise ValueError("CudaGraphs runs only on a bucket of its DeviceBatch's buffer (buffer[:bucket]), whose address never changes")
        if bucket not in self.graphs:
            self.graphs[bucket] = self._capture(self.model, self.batch.buffer[:bucket])
            self.captures += 1
        replay, output = self.graphs[bucket]
        replay()
        self.replays += 1
        return output

    def capture_all(self) -> None:
        """Capture every bucket up front (at warm-up), so no request pays for a capture."""
        for bucket in self.batch.sizes:
            if bucket not in self.graphs:
                self.graphs[bucket] = self._capture(self.model, self.batch.buffer[:bucket])
                self.captures += 1


# -- the whole path -----------------------------------------------------------------


def head_output(out) -> torch.Tensor:
    """Ultralytics' eval forward returns ``(raw, features)``; exported programs return ``raw``."""
    return out[0] if isinstance(out, (list, tuple)) else out


class DevicePath:
    """uint8 HWC images (any sizes) -> boxes, with pre- and post-processing on ``device``.

    ``model`` takes the NCHW input of the buffer's dtype and returns the raw
    head ``[N, 4 + nc, A]`` (eager module, compiled package, ...).
    ``cuda_graphs=True`` replays one graph per bucket (CUDA only: raises
    :class:`GraphsUnavailable` with the reason elsewhere).
    """

    def __init__(
        self,
        model: Callable[[torch.Tensor], torch.Tensor],
        *,
        imgsz: int,
        max_batch: int,
        device: torch.device | str = "cpu",
        dtype: torch.dtype = torch.float32,
        pad_value: int = 114,
        scale: float = 1 / 255.0,
        cuda_graphs: bool = False,
        channels_last: bool = False,
    ):
        self.batch = DeviceBatch(imgsz, max_batch, device, dtype, pad_value, scale)
        if channels_last:
            self.batch.buffer = self.batch.buffer.contiguous(memory_format=torch.channels_last)
        self._model = model
        run = lambda x: head_output(model(x))  # noqa: E731
        self.graphs = CudaGraphs(run, self.batch) if cuda_graphs else None
        self.run = self.graphs or run
        self.device = self.batch.device

    @torch.inference_mode()
    def detect(self, images: Sequence[torch.Tensor], params: DetectParams | Sequence[DetectParams]) -> list[Detections]:
        """Boxes on each original image, in input order; batches of up to ``max_batch``, padded to their bucket."""
        per_image = [params] * len(images) if isinstance(params, DetectParams) else list(params)
        out: list[Detections] = []
        step = self.batch.max_batch
        for start in range(0, len(images), step):
            x, geometries = self.batch.pack(images[start : start + step])
            raw = self.run(x)
            out += device_boxes(raw, geometries, per_image[start : start + step])
        return out
