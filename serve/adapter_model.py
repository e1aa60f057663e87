"""The serving contract for a user's own Dataloop adapter: its ``prepare_item_func`` and ``predict``, unchanged.

The second implementation of :class:`~detserve.serve.contract.ServingContract`
(the first is ``ExportedModel``): the same deployment serves it, with the same
admission, fair batches and autoscaling. Per stage:

- ``setup``: import the adapter's class, build the model entity from
  ``dataloop.json`` and ``load_from_model`` with the folder's artifacts
  (``adapters/user_adapter.py``), offline;
- ``prepare`` (decode threads): the image's header is checked with detserve's
  limits and codes, the image becomes a ``dl.Item`` (``RequestItem``) and the
  adapter's ``prepare_item_func`` (or dtlpy's default) prepares it. It raising
  (or returning None, as dtlpy's default loader does for an unreadable image)
  is that image's 422 ``prepare_failed``;
- ``predict`` (engine lanes, ``runtime.concurrency`` at once, 1 by default:
  adapters are not assumed thread-safe): one ``predict(batch)`` call per batch
  the scheduler forms, up to the configuration's ``batch_size``. Raising is a
  500 ``inference_failed`` for that batch's images; a return value that is not
  one collection per image is a 500 ``invalid_prediction`` saying what came back;
- ``encode``: detserve's answer, with each image's collection as Dataloop JSON.

A request's ``conf``/``iou``/``max_det`` reach the adapter as configuration
values only where its module reads the key (``parameter_keys``); ``/info``
says which.
"""

from __future__ import annotations

import collections
import contextlib
import io
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np

from detserve.adapters.dataloop_app import read_app
from detserve.adapters.user_adapter import InvalidOutput, RequestItem, annotations_json, load_adapter, one_line, parameter_keys
from detserve.runtime.images import ImageError, ImageInput, Limits, probe
from detserve.serve.batching import BatchTimings, Item
from detserve.serve.contract import InvalidPrediction, PredictionError, ServingContract

#: The side of the gray image ``sample`` hands ``prepare_item_func`` when the configuration names no input size.
SAMPLE_SIDE = 640


class AdapterModel(ServingContract):
    """A Dataloop app folder's model, served through its own adapter."""

    def __init__(self, folder: str | Path, model: str | None = None):
        self.app = read_app(folder)
        self.model = self.app.model(model)
        self.predict_threads = self.model.concurrency
        self.adapter = None
        self.keys: dict[str, str | None] = {}
        self.overrides = ConfigurationOverrides()
        self.predict_sizes: collections.Counter[int] = collections.Counter()
        self._lock = threading.Lock()

    # ---- setup ---------------------------------------------------------------
    def setup(self) -> None:
        self.adapter = load_adapter(self.app, self.model)
        self.keys = parameter_keys(self.app, self.model)
        self.configuration = self.adapter.model_entity.configuration  # the plain dict: writes stay local
        self.batch_size = max(1, int(self.configuration.get("batch_size") or 1))

    @property
    def max_batch(self) -> int:
        return self.batch_size

    # ---- a request's settings ----------------------------------------------------
    def params(self, conf=None, iou=None, max_det=None) -> tuple[tuple[str, Any], ...]:
        """The configuration values this request sets: only keys the adapter reads, in a fixed order."""
        given = {"conf": conf, "iou": iou, "max_det": max_det}
        return tuple((self.keys[p], v) for p, v in given.items() if v is not None and self.keys.get(p))

    # ---- prepare (decode threads) ----------------------------------------------
    def prepare(self, data: ImageInput, limits: Limits) -> Item:
        start = time.perf_counter()
        raw = _file_bytes(data)
        header = probe(raw, limits)
        item = RequestItem.of(raw, header)
        try:
            prepared = self.adapter.prepare_item_func(item)
        except Exception as exc:
            raise ImageError("prepare_failed", f"the adapter's prepare_item_func failed on this image: {one_line(exc)}") from None
        if prepared is None:
            raise ImageError("prepare_failed", "the adapter's prepare_item_func returned None for this image "
                                               "(dtlpy's default loader does so when it cannot read an image)")  # fmt: skip
        # The answer gives the upright size, as for an exported model; the item has the size as stored, as Pillow
        # opens the file. Which frame the adapter's boxes are in is its own affair (Ultralytics applies EXIF itself).
        width, height = header.upright_size
        return Item(prepared, width=width, height=height, decode_s=time.perf_counter() - start, frames=header.frames)

    # ---- predict (engine lanes) ---------------------------------------------------
    def predict(self, items: list[Item], params: list[Any], timings: BatchTimings) -> list[Any]:
        """One ``predict(batch)`` per distinct request setting (usually one per batch), each batch's output checked."""
        now = time.perf_counter()
        timings.size = len(items)
        timings.queue_s = [now - item.queued_at for item in items]
        results: list[Any] = [None] * len(items)
        for setting in dict.fromkeys(params):
            members = [i for i, p in enumerate(params) if p == setting]
            batch = [items[i].prepared for i in members]
            start = time.perf_counter()
            try:
                with self.overrides.applied(self.configuration, setting):
                    output = self.adapter.predict(batch)
            except Exception as exc:
                failed: Exception = PredictionError(f"the adapter's predict raised {one_line(exc)}")
                output = None
            else:
                failed = None
            mid = time.perf_counter()
            with self._lock:
                self.predict_sizes[len(batch)] += 1
            if failed is None:
                try:
                    answers = annotations_json(output, len(batch))
                except InvalidOutput as exc:
                    failed = InvalidPrediction(str(exc))
            for n, i in enumerate(members):
                results[i] = failed if failed is not None else answers[n]
            timings.engine_s += mid - start
            timings.postprocess_s += time.perf_counter() - mid
        return results

    # ---- encode, describe --------------------------------------------------------
    def annotations(self, result: list[dict]) -> list[dict]:
        return result

    def describe(self) -> dict:
        return {
            "name": self.model.name,
            "version": self.app.name,
            "family": "dataloop-adapter",
            "backend": f"adapter:{self.model.class_name}",
            "device": "adapter",
            "labels": self.labels(),
            "adapter": {
                "folder": str(self.app.folder),
                "entry_point": self.model.entry_point.name,
                "class": self.model.class_name,
                "artifacts": str(self.model.artifacts),
                "pod_type": self.model.pod_type,
                "concurrency": self.model.concurrency,
            },
            # A request's conf/iou/max_det -> the configuration key it sets, or None: the adapter does not read one.
            "parameters": self.keys,
            "batch": {"max": self.batch_size},
        }

    def labels(self) -> dict[int, str]:
        """The model's classes by id: its configuration's ``id_to_label_map`` when it has one, else its labels in order."""
        mapping = self.configuration.get("id_to_label_map")
        if isinstance(mapping, dict) and mapping:
            return {int(k): str(v) for k, v in mapping.items()}
        return dict(enumerate(self.model.labels))

    def sample(self) -> Item:
        side = int(self.configuration.get("imgsz") or self.configuration.get("input_size") or SAMPLE_SIDE)
        gray = np.full((side, side, 3), 114, np.uint8)
        return self.prepare(gray, Limits())

    def stats(self) -> dict:
        with self._lock:
            return {"predict_batch_sizes": dict(sorted(self.predict_sizes.items()))}


class ConfigurationOverrides:
    """A request's configuration values for the one adapter a replica shares: calls with equal values run
    together (up to ``runtime.concurrency``), a call with other values waits until they are done, and the
    adapter's own values come back after each."""

    def __init__(self) -> None:
        self._changed = threading.Condition()
        self._running = 0
        self._active: tuple = ()
        self._saved: dict[str, Any] = {}

    @contextlib.contextmanager
    def applied(self, configuration: dict, values: tuple[tuple[str, Any], ...]):
        missing = object()
        with self._changed:
            while self._running and self._active != values:
                self._changed.wait()
            if not self._running:
                self._saved = {key: configuration.get(key, missing) for key, _ in values}
                configuration.update(values)
                self._active = values
            self._running += 1
        try:
            yield
        finally:
            with self._changed:
                self._running -= 1
                if not self._running:
                    for key, value in self._saved.items():
                        if value is missing:
                            configuration.pop(key, None)
                        else:
                            configuration[key] = value
                    self._saved, self._active = {}, ()
                    self._changed.notify_all()


def _file_bytes(data: ImageInput) -> bytes:
    """The image file a Dataloop item would hold: bytes as sent; a path's file; a PIL image or an array as PNG (lossless)."""
    if isinstance(data, (bytes, bytearray, memoryview)):
        return bytes(data)
    if isinstance(data, (str, Path)):
        path = Path(data)
        if not path.is_file():
            raise ImageError("not_found", f"no image file at {path}")
        return path.read_bytes()
    from PIL import Image

    if isinstance(data, np.ndarray):
        from detserve.runtime.images import decode

        data = Image.fromarray(decode(data))  # RGB, RGBA or gray arrays, checked as decode checks them
    if isinstance(data, Image.Image):
        buffer = io.BytesIO()
        data.save(buffer, format="PNG")
        return buffer.getvalue()
    raise ImageError("unsupported_type", f"cannot read an image from {type(data).__name__}: pass bytes, a path, a PIL image or an HxWx3 uint8 array")
