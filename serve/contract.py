"""The serving contract: the model's stages, which the Ray deployment (serve/app.py) wraps.

In the manner of LitServe's ``LitAPI``, a model is served through a few
stages, each a method with one job. The deployment owns everything else: HTTP,
admission by deadline, fair batches across requests, the batch policy,
metrics, autoscaling. A stage never sees a request, a deadline or Ray.

==========================  ===========================================  ===========================
stage                       what it does                                 where it runs
==========================  ===========================================  ===========================
``setup()``                 load the model, warm it up                   once per replica, at start
``params(conf, iou, ...)``  one request's settings (hashable)            the event loop
``prepare(data, limits)``   decode and prepare ONE image -> ``Item``     the decode threads, several at once
``predict(items, params)``  ONE batch, images of any requests -> one     the engine lanes (``predict_threads``
                            result (or Exception) per image               at most at once)
``encode(items, results)``  one request's answer body                    the event loop, or a decode
                                                                         thread for a large answer
``describe()``              what ``/info`` shows                         the event loop
``sample()``                an ``Item`` of the model's full input size:  at start
                            the replica times ``predict`` on it at each
                            batch size (admission plans with that cost)
``check()``                 the health check                             an engine lane
==========================  ===========================================  ===========================

Errors: ``prepare`` raises :class:`~detserve.runtime.images.ImageError` for an
image it cannot use (its ``code`` picks the 4xx); ``predict`` returns an
Exception in place of a result for an image that failed, and a
:class:`PredictionError` says which 500 ``code`` the client sees.

Two implementations: :class:`ExportedModel` here (an export folder on
detserve's engines) and ``serve.adapter_model.AdapterModel`` (a user's own
Dataloop adapter folder). Neither module imports Ray, and this one imports no
dtlpy: the benchmark peers (benchmarks/peers.py) wrap the same classes.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import numpy as np

from detserve.runtime.images import ImageInput, Limits
from detserve.serve.batching import BatchTimings, Item, prepare, run_batch


class PredictionError(Exception):
    """A batch's images failed in ``predict``; ``code`` is the 500 error code the client sees."""

    code = "inference_failed"


class InvalidPrediction(PredictionError):
    """``predict`` returned something other than one result per image of the batch."""

    code = "invalid_prediction"


#: The model block of every answer: these keys of ``describe()``, and these where the model has them (an export's
#: precision and the variant that runs: docs/precision.md).
SUMMARY_KEYS = ("name", "version", "backend", "device")
OPTIONAL_SUMMARY_KEYS = ("precision", "variant")


class ServingContract:
    """The stages a served model implements (see the module docstring); the defaults do the common case."""

    #: At most this many ``predict`` calls at once in one replica; None: the engine is thread-safe (lanes from CPUs).
    predict_threads: int | None = None

    def setup(self) -> None:
        """Load the model and warm it up (once per replica, before any request)."""

    @property
    def max_batch(self) -> int:
        """The most images one ``predict`` call takes."""
        raise NotImplementedError

    def params(self, conf: float | None = None, iou: float | None = None, max_det: int | None = None) -> Any:
        """One request's settings, hashable: images with equal settings share a ``predict`` call."""
        raise NotImplementedError

    def prepare(self, data: ImageInput, limits: Limits) -> Item:
        """Decode and prepare one image (a decode thread); raise ImageError for an image this model cannot use."""
        raise NotImplementedError

    def predict(self, items: list[Item], params: list[Any], timings: BatchTimings) -> list[Any]:
        """One batch: a result per item, in order, or an Exception in place of a failed item's result."""
        raise NotImplementedError

    def boxes(self, result: Any) -> int:
        """How many boxes one result holds (a small answer is encoded on the event loop)."""
        return len(result)

    def encode(self, items: list[Item], results: list[Any]) -> dict:
        """One request's answer: ``{"model": ..., "results": [{"width", "height", "frames", "annotations"}, ...]}``."""
        return {
            "model": self.summary(),
            "results": [
                {"width": item.width, "height": item.height, "frames": item.frames, "annotations": self.annotations(result)}
                for item, result in zip(items, results)
            ],
        }

    def annotations(self, result: Any) -> list[dict]:
        """One image's result as Dataloop annotation JSON."""
        raise NotImplementedError

    def describe(self) -> dict:
        """What ``/info`` shows: at least the ``SUMMARY_KEYS`` and ``labels``."""
        raise NotImplementedError

    def summary(self) -> dict:
        """The model block of every answer."""
        info = self.describe()
        return {key: info[key] for key in SUMMARY_KEYS} | {key: info[key] for key in OPTIONAL_SUMMARY_KEYS if key in info}

    def sample(self) -> Item:
        """One image of the model's full input size, prepared: what the start-up cost curve is timed on."""
        raise NotImplementedError

    def check(self) -> None:
        """The health check: raise if the model no longer answers."""

    def stats(self) -> dict:
        """Counters of this model's own, merged into ``/stats``."""
        return {}


class ExportedModel(ServingContract):
    """An export folder (manifest + artifact) on detserve's engines: decode + letterbox, one engine call per batch.

    ``name`` replaces the manifest's (an accelerated adapter answers under its model's name; its export's
    manifest holds the thresholds the adapter applied).
    """

    def __init__(
        self,
        folder: str | Path,
        *,
        backend: str = "auto",
        device: str = "auto",
        threads: int = 1,
        fast_decode: bool = False,
        precision: str = "fp32",
        name: str | None = None,
    ):
        self.folder = Path(folder)
        self.options = {"backend": backend, "device": device, "threads": threads, "precision": precision}
        self.fast_decode = fast_decode
        self.name = name
        self.detector = None
        self.labels: dict[int, str] = {}
        self.info: dict = {}

    def setup(self) -> None:
        from detserve.runtime.detector import Detector

        self.detector = Detector(self.folder, **self.options)
        self.labels = dict(self.detector.labels)
        self.detector.warmup()
        self.info = self.detector.describe()
        if self.name:
            self.info["name"] = self.name

    @property
    def max_batch(self) -> int:
        return self.detector.engine.max_batch

    def params(self, conf=None, iou=None, max_det=None):
        return self.detector.params(conf=conf, iou=iou, max_det=max_det)

    def prepare(self, data: ImageInput, limits: Limits) -> Item:
        return prepare(self.detector, data, limits, self.fast_decode)

    def predict(self, items, params, timings):
        return run_batch(self.detector, items, params, timings)

    def annotations(self, result) -> list[dict]:
        from detserve.adapters.box_json import box_annotations

        return box_annotations(result, self.labels, self.info["name"], None)

    def describe(self) -> dict:
        m = self.detector.manifest
        return {**self.info, "labels": self.labels, "input": m.input.model_dump(), "batch": m.batch.model_dump(),
                "precision_choice": self.detector.choice.describe()}  # fmt: skip

    def sample(self) -> Item:
        spec = self.detector.manifest.input
        side = spec.imgsz or spec.min_size or 320
        start = time.perf_counter()
        prepared = self.detector.prepare(np.full((side, side, 3), 114, np.uint8))
        return Item(prepared, width=side, height=side, decode_s=time.perf_counter() - start)

    def check(self) -> None:
        self.detector.warmup()
