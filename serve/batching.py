"""The batch logic of the server, as plain functions (``@serve.batch`` only runs inside a replica).

A request's images are decoded and preprocessed one by one, in threads, as they
arrive (``prepare``); the batcher then hands a list of such jobs to
``run_batch``, which makes one engine call for all of them and post-processes
each job with its own settings. A job whose image breaks the engine fails
alone: the batch is retried image by image to find it.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from detserve.runtime.detector import Detector, Prepared
from detserve.runtime.images import ImageInput, Limits, frame_count
from detserve.runtime.postprocess import DetectParams, Detections


@dataclass
class Job:
    """One image on its way through the server."""

    prepared: Prepared
    params: DetectParams
    width: int
    height: int
    decode_s: float = 0.0
    frames: int = 1  # of the file; the boxes are the first frame's
    enqueued_at: float = field(default_factory=time.perf_counter)


@dataclass
class BatchTimings:
    size: int = 0
    engine_s: float = 0.0
    postprocess_s: float = 0.0
    queue_s: list[float] = field(default_factory=list)


def prepare(detector: Detector, data: ImageInput, params: DetectParams, limits: Limits) -> Job:
    """Decode and preprocess one image (runs in a worker thread, overlapped with inference)."""
    start = time.perf_counter()
    image = detector.decode(data, limits)
    prepared = detector.preprocess([image])
    return Job(prepared, params, width=image.shape[1], height=image.shape[0], decode_s=time.perf_counter() - start,
               frames=frame_count(data))  # fmt: skip


def run_batch(detector: Detector, jobs: list[Job], timings: BatchTimings | None = None) -> list[Detections | Exception]:
    """Detections for each job, in order; an image that breaks the engine gets its exception instead."""
    timings = timings if timings is not None else BatchTimings()
    now = time.perf_counter()
    timings.size = len(jobs)
    timings.queue_s = [now - job.enqueued_at for job in jobs]
    try:
        return _run(detector, jobs, timings)
    except Exception as exc:
        if len(jobs) == 1:
            return [exc]
    results: list[Detections | Exception] = []
    for job in jobs:  # find the one that fails; the others still get their boxes
        try:
            results.extend(_run(detector, [job], BatchTimings()))
        except Exception as exc:
            results.append(exc)
    return results


def _run(detector: Detector, jobs: list[Job], timings: BatchTimings) -> list[Detections | Exception]:
    start = time.perf_counter()
    prepared = detector.join([job.prepared for job in jobs])
    outputs = detector.infer(prepared)
    mid = time.perf_counter()
    results = detector.postprocess(outputs, prepared, [job.params for job in jobs])
    timings.engine_s = mid - start
    timings.postprocess_s = time.perf_counter() - mid
    return list(results)
