"""The server's per-image and per-batch work, as plain functions (the scheduler and tests call them directly).

An image is decoded and prepared once, in a worker thread, as its request
arrives (``prepare``); the scheduler (``serve.scheduler``) later hands a batch
of such images, from any requests, to ``run_batch``, which packs and runs them
(``Detector.run``) and post-processes each with its own request's settings.
An image that breaks the engine fails alone: the batch is retried image by
image to find it.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from detserve.runtime.detector import Detector, StageTimes
from detserve.runtime.images import ImageInput, Limits, frame_count
from detserve.runtime.postprocess import DetectParams, Detections
from detserve.runtime.preprocess import PreparedImage


@dataclass
class Item:
    """One image on its way through the server."""

    prepared: PreparedImage
    width: int
    height: int
    decode_s: float = 0.0
    frames: int = 1  # of the file; the boxes are the first frame's
    queued_at: float = field(default_factory=time.perf_counter)


@dataclass
class BatchTimings:
    size: int = 0
    engine_s: float = 0.0
    postprocess_s: float = 0.0
    queue_s: list[float] = field(default_factory=list)


def prepare(detector: Detector, data: ImageInput, limits: Limits, fast_decode: bool = False) -> Item:
    """Decode and prepare one image (runs in a worker thread, overlapped with inference).

    ``fast_decode``: a large JPEG decodes at a reduced scale that still covers the model input.
    """
    start = time.perf_counter()
    if fast_decode:
        image, (height, width) = detector.decode_reduced(data, limits)
        prepared = detector.prepare(image, (height, width))
    else:
        image = detector.decode(data, limits)
        (height, width), prepared = image.shape[:2], detector.prepare(image)
    return Item(prepared, width=width, height=height, decode_s=time.perf_counter() - start, frames=frame_count(data))


def run_batch(
    detector: Detector, items: list[Item], params: list[DetectParams], timings: BatchTimings | None = None
) -> list[Detections | Exception]:
    """Detections for each item, in order; an image that breaks the engine gets its exception instead."""
    timings = timings if timings is not None else BatchTimings()
    now = time.perf_counter()
    timings.size = len(items)
    timings.queue_s = [now - item.queued_at for item in items]
    times = StageTimes()
    try:
        results: list[Detections | Exception] = list(detector.run([i.prepared for i in items], params, times))
    except Exception as exc:
        if len(items) == 1:
            return [exc]
        results = []
        for item, p in zip(items, params):  # find the one that fails; the others still get their boxes
            try:
                results.extend(detector.run([item.prepared], [p], times))
            except Exception as exc:
                results.append(exc)
    timings.engine_s, timings.postprocess_s = times.engine_s, times.postprocess_s
    return results
