"""The Ray Serve deployment: an adapter behind dynamic batching, reached over HTTP and handles.

Request path, one stage per line (see ``DetectionServer.detect``):

    bytes --decode+preprocess (thread pool)--> Job --@serve.batch--> one engine call
          --postprocess per request--> Dataloop box annotations

Decoding runs in worker threads while the engine thread runs the previous
batch, so the two overlap. The deployment knows adapters and detectors, never
which engine (ONNX, TensorRT, torch) is underneath.

``build_app(args)`` is the import path for ``deploy.yaml``; the defaults here are
for a CPU pod and are overridden per application there.
"""



import asyncio
import collections
import logging
import math
import os
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Literal

from detserve.runtime import offline

offline.apply()

import psutil  # noqa: E402
from fastapi import Request  # noqa: E402
from pydantic import BaseModel, ConfigDict, Field  # noqa: E402
from ray import serve  # noqa: E402

from detserve.runtime.images import ImageError, ImageInput, Limits, probe  # noqa: E402
from detserve.runtime.postprocess import DetectParams, Detections  # noqa: E402
from detserve.serve.batching import BatchTimings, Item, prepare, run_batch  # noqa: E402
from detserve.serve.admission import (  # noqa: E402
    ADMIT_HEADER, REFUSED_BY_HEADER, DecodeCost, RequestCost, request_budget_s, retry_after_header,
)  # fmt: skip
from detserve.serve.scheduler import Overloaded, Scheduler, Settings, measure_curve, probe_sizes  # noqa: E402
from detserve.serve.proxy_admission import TIMEOUT_HEADER, parse_timeout  # noqa: E402
from detserve.serve.http import ApiError, RequestLimits, build_api, image_error  # noqa: E402
from detserve.serve.proxy_errors import RECEIVED_AT_HEADER  # noqa: E402

log = logging.getLogger("ray.serve")

# The batch size is a cap: the replica measures the engine's cost per image at
# each size up to it (warm-up, then every batch) and runs the cheapest
# (serve/scheduler.py). No batch wait on CPU: lanes take whatever is ready.
DEFAULT_MAX_BATCH_SIZE = 8
DEFAULT_BATCH_WAIT_S = 0.0


class AppArgs(BaseModel):
    """``args`` of an application in deploy.yaml."""

    model_config = ConfigDict(extra="forbid")

    model: str = Field("yolo", description="export folder, or the name of a default model (yolo, fasterrcnn)")
    backend: str = "auto"
    device: str = "auto"
    precision: Literal["fp32", "int8", "auto"] = Field(
        "fp32", description="fp32: the exact export; int8: its gated int8 variant; auto: the fastest variant whose accuracy gate "
        "passed, timed at start on this machine (docs/precision.md)")  # fmt: skip
    threads: int = Field(1, ge=1, description="intra-op threads per engine call")
    lanes: int | None = Field(None, ge=1, description="engine calls at once; default: the CPUs Ray gives the replica (at least 1)")
    decode_threads: int | None = Field(None, ge=1, description="decode/prepare threads; default: lanes + 1")
    express_lane: bool = Field(True, description="one more engine call, for new requests only, while every lane runs a large "
                               "request's continuing images (serve/scheduler.py, 'Express lane')")
    request_timeout_s: float = Field(30.0, gt=0, description="the deadline of a request without its own; keep it at http_options.request_timeout_s")
    max_queued_images: int = Field(1024, ge=1, description="admitted images not yet answered, per replica (memory bound)")
    max_body_bytes: int = 50 * 1024 * 1024
    max_images: int = 64
    max_pixels: int = 40_000_000
    fast_decode: bool = Field(False, description="decode large JPEGs at a reduced scale that still covers the model input "
                              "(letterbox models; boxes can differ slightly from the exact path: README, 'Fast decode')")


class UserConfig(BaseModel):
    """``user_config`` of the deployment: changeable without restarting replicas."""

    model_config = ConfigDict(extra="forbid")

    max_batch_size: int = Field(DEFAULT_MAX_BATCH_SIZE, ge=1, description="a cap: the measured cost curve picks the size")
    batch_wait_timeout_s: float = Field(DEFAULT_BATCH_WAIT_S, ge=0)
    batch_policy: Literal["measured", "fixed"] = Field(
        "measured", description="measured: the cheapest size per image up to the cap; fixed: always aim for max_batch_size"
    )


#: An answer with at most this many boxes is encoded on the event loop (some 2 µs a box): the hop to a thread
#: and back cost more than that, on a replica whose cores the engine already keeps busy.
INLINE_ENCODE_BOXES = 64

#: The client's own deadline, in seconds (Ray's proxy honours the same header for its timeout).
DEADLINE_HEADER = TIMEOUT_HEADER.decode()


def replica_cpus() -> int:
    """The CPUs Ray gives this replica (``ray_actor_options.num_cpus``), at least 1."""
    try:
        import ray

        if not ray.is_initialized():  # outside Ray (in-process tests): get_runtime_context() would start one
            return 1
        cpus = ray.get_runtime_context().get_assigned_resources().get("CPU", 1.0)
    except Exception:  # outside a Ray worker
        cpus = 1.0
    return max(1, int(cpus))


def waited_since_proxy(request: Request) -> float:
    """Seconds since the proxy received this request (its ``x-detserve-received-at`` stamp); 0 without one.

    Wall clocks: the proxy and the replica may be on different nodes, so a stamp from the
    future (clock skew) counts as 0, and the deadline never grows because of it.
    """
    value = request.headers.get(RECEIVED_AT_HEADER.decode())
    try:
        stamp = float(value) if value is not None else math.nan
    except ValueError:
        return 0.0
    return max(0.0, time.time() - stamp) if math.isfinite(stamp) else 0.0


def header_timeout(request: Request) -> float | None:
    """The client's deadline from the ``x-request-timeout-seconds`` header, if it gave a usable one."""
    return parse_timeout(request.headers.get(DEADLINE_HEADER))


def resolve_model(model: str) -> Path:
    """A default model's name -> its export folder (``detserve models`` exports them); else a path."""
    from detserve.runtime.defaults import DEFAULT_MODELS, default_folder

    if model in DEFAULT_MODELS:
        return default_folder(model)
    path = Path(model).expanduser()
    if not path.is_absolute():
        from detserve.runtime.paths import root

        path = root() / path
    return path


class _Metrics:
    """Serve metrics (Ray's Prometheus endpoint), per application."""

    def __init__(self) -> None:
        from ray.serve import metrics

        ms = [0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1, 2, 5]
        self.batch_size = metrics.Histogram("detserve_batch_size", "images per engine batch", [1, 2, 4, 8, 16, 32, 64])
        self.queue_wait = metrics.Histogram("detserve_queue_wait_seconds", "time an image waited for its batch", ms)
        self.decode = metrics.Histogram("detserve_decode_seconds", "decode + preprocess time per image", ms)
        self.engine = metrics.Histogram("detserve_engine_seconds", "engine time per batch", ms)
        self.postprocess = metrics.Histogram("detserve_postprocess_seconds", "post-processing time per batch", ms)
        self.images = metrics.Counter("detserve_images_total", "images answered")
        self.errors = metrics.Counter("detserve_errors_total", "failed images by kind", tag_keys=("kind",))


@serve.deployment(
    name="DetectionServer",
    # Requests must reach the replica to be admitted by deadline (serve/scheduler.py):
    # Ray's own queue in front of it only ever sees overflow beyond this (deploy.yaml says why 2048).
    max_ongoing_requests=2048,
    max_queued_requests=256,
    backpressure_config={"status_code": 503, "retry_after_s": 1},
    health_check_period_s=10,
    health_check_timeout_s=30,
    graceful_shutdown_timeout_s=30,
    ray_actor_options={"num_cpus": 1},
    autoscaling_config={
        "min_replicas": 1,
        "initial_replicas": 1,
        "max_replicas": 2,
        "target_ongoing_requests": 8,
        "upscale_delay_s": 5,
        "downscale_delay_s": 60,
    },
)
@serve.ingress()  # the app is built per replica, around the replica: __serve_build_asgi_app__
class DetectionServer:
    def __init__(self, args: dict[str, Any] | None = None):
        from detserve.adapters import adapter_for

        self.args = AppArgs(**(args or {}))
        folder = resolve_model(self.args.model)
        self.adapter = adapter_for(folder, backend=self.args.backend, device=self.args.device, threads=self.args.threads,
                                   precision=self.args.precision)
        self.detector = self.adapter.detector
        self.limits = Limits(max_pixels=self.args.max_pixels, max_bytes=self.args.max_body_bytes)
        self.request_limits = RequestLimits(self.args.max_body_bytes, self.args.max_images)
        lanes = self.args.lanes or replica_cpus()
        # Cores accounted for: ``lanes`` engine calls at once (one intra-op thread
        # each by default) plus decode threads that fill the gaps between them. The
        # express lane's thread runs only beside a large request's batches, one small batch at a time.
        settings = Settings(lanes=lanes, express=self.args.express_lane)
        self.decode_pool = ThreadPoolExecutor(self.args.decode_threads or lanes + 1, thread_name_prefix="decode")
        self.engine_pool = ThreadPoolExecutor(lanes + settings.express, thread_name_prefix="engine")
        self.metrics = _Metrics()
        self.stage_seconds: collections.Counter[str] = collections.Counter()
        self.detector.warmup()
        self.info = self.detector.describe()
        self.scheduler = Scheduler(self._run_batch, settings, executor=self.engine_pool)
        self._measure_cost_curve()
        self.scheduler.decode = self._measure_decode()
        self.replica_tag = _replica_tag()
        log.info("detserve replica ready: %s, %s", self.info, self.scheduler.stats())

    def _measure_cost_curve(self) -> None:
        """Time the engine at each batch size up to the cap, on an image of the model's full input size."""
        import numpy as np

        spec = self.detector.manifest.input
        side = spec.imgsz or spec.min_size or 320
        sample = self.detector.prepare(np.full((side, side, 3), 114, np.uint8))
        params = self.detector.params()
        cap = min(self.scheduler.settings.max_batch_size, self.detector.engine.max_batch)
        self.scheduler.curve = measure_curve(lambda n: self.detector.run([sample] * n, params), probe_sizes(cap))

    def _measure_decode(self) -> DecodeCost:
        """Time decode + prepare per megapixel for JPEG and PNG, on a photo-like image (admission by pixels)."""
        import io

        import numpy as np
        from PIL import Image

        rng = np.random.default_rng(0)
        side = 1024  # a megapixel: big enough that the per-pixel cost dominates
        ramp = np.linspace(0, 255, side, dtype=np.float32)
        pixels = (ramp[None, :, None] * 0.5 + ramp[:, None, None] * 0.3 + rng.normal(0, 12, (side, side, 3))).clip(0, 255).astype(np.uint8)
        cost = DecodeCost()
        for fmt, options in (("jpeg", {"quality": 90}), ("png", {})):
            buf = io.BytesIO()
            Image.fromarray(pixels).save(buf, format=fmt.upper(), **options)
            data = buf.getvalue()
            seconds = min(prepare(self.detector, data, Limits()).decode_s for _ in range(2))
            cost.observe(fmt, side * side, seconds)
        return cost

    def reconfigure(self, user_config: dict) -> None:
        config = UserConfig(**(user_config or {}))
        settings = self.scheduler.settings
        cap = min(config.max_batch_size, self.detector.engine.max_batch)
        remeasure = cap > max(self.scheduler.curve.seconds, default=0)
        settings.max_batch_size = cap
        settings.batch_wait_s = config.batch_wait_timeout_s
        settings.policy = config.batch_policy
        if remeasure:
            self._measure_cost_curve()

    async def check_health(self) -> None:
        """Healthy when the engine still answers a tiny image."""
        loop = asyncio.get_running_loop()
        await asyncio.wait_for(loop.run_in_executor(self.engine_pool, self.detector.warmup), timeout=20)

    # ---- the batch (engine thread) --------------------------------------
    def _run_batch(self, items: list[Item], params: list[DetectParams]) -> list[Detections | Exception]:
        timings = BatchTimings()
        results = run_batch(self.detector, items, params, timings)
        self.stage_seconds["engine"] += timings.engine_s
        self.stage_seconds["postprocess"] += timings.postprocess_s
        self.stage_seconds["queue_wait"] += sum(timings.queue_s)
        m = self.metrics
        m.batch_size.observe(timings.size)
        m.engine.observe(timings.engine_s)
        m.postprocess.observe(timings.postprocess_s)
        for wait in timings.queue_s:
            m.queue_wait.observe(wait)
        return results

    # ---- the request path ----------------------------------------------
    def budget_s(self, timeout_s: float | None) -> float:
        """The seconds a request has from arrival to answer: its own timeout (if shorter) or the server's, less the margin."""
        return request_budget_s(self.args.request_timeout_s, timeout_s)

    def deadline(self, timeout_s: float | None, waited_s: float = 0.0) -> float:
        """The clock time this request must be answered by.

        ``waited_s``: how long ago the server (its HTTP proxy) received the request; the deadline counts from then.
        """
        budget = self.budget_s(timeout_s)
        return time.monotonic() + budget - min(max(waited_s, 0.0), budget)

    def request_cost(self, images: list[ImageInput]) -> tuple[RequestCost, list[tuple[str, int]]]:
        """What admission costs a request by, from its images' headers (no decode), and each image's (format, pixels)."""
        probes = [probe(image) for image in images]
        decode = self.scheduler.decode
        return RequestCost(len(images), sum(decode.predict(fmt, px) for fmt, px in probes), sum(px for _, px in probes)), probes

    async def detect(self, images: list[ImageInput], params: DetectParams, deadline: float, budget_s: float | None = None) -> dict:
        """admit -> decode + prepare (threads) -> fair batches (engine) -> postprocess -> annotations."""
        cost, probes = self.request_cost(images)
        try:
            ticket = self.scheduler.admit(cost, deadline, params, budget_s)
        except Overloaded as exc:
            self.metrics.errors.inc(tags={"kind": "overloaded"})
            if exc.hopeless:
                raise ApiError(422, "deadline_too_short", f"{exc.reason}: give a longer {DEADLINE_HEADER}, or fewer or smaller images") from None
            raise ApiError(
                503, "overloaded",
                f"the server is busy: {exc.reason}. Retry after {retry_after_header(exc.retry_after_s)} s "
                "(the Retry-After header), or send fewer images per request",
                headers={"Retry-After": retry_after_header(exc.retry_after_s), REFUSED_BY_HEADER: "replica"},
            ) from None  # fmt: skip
        reason = None
        try:
            # The whole answer, decode included, is bounded by the deadline (monotonic = the loop's clock).
            async with asyncio.timeout_at(deadline):
                items = await self._prepare_all(ticket, images, probes)
                detections = await self.scheduler.wait(ticket)
        except TimeoutError:
            reason = "deadline"
            self.metrics.errors.inc(tags={"kind": "deadline"})
            raise ApiError(
                408, "deadline_exceeded",
                f"the request was not answered within its deadline ({len(images)} images, "
                f"{self.scheduler.outstanding} queued); retry, or give a longer {DEADLINE_HEADER} header",
            ) from None  # fmt: skip
        except asyncio.CancelledError:
            reason = "cancelled"  # the client went away: what has not run is dropped
            raise
        finally:
            self.scheduler.release(ticket, reason)
        for det in detections:
            if isinstance(det, Exception):
                self.metrics.errors.inc(tags={"kind": "engine"})
                raise ApiError(500, "inference_failed", f"the model failed on this image: {det}")
        self.metrics.images.inc(len(detections))
        start = time.perf_counter()
        if sum(map(len, detections)) <= INLINE_ENCODE_BOXES:
            body = self.encode(items, detections)
        else:  # off the loop: other requests go on meanwhile
            body = await asyncio.get_running_loop().run_in_executor(self.decode_pool, self.encode, items, detections)
        self.stage_seconds["encode"] += time.perf_counter() - start
        return body

    async def _prepare_all(self, ticket, images: list[ImageInput], probes: list[tuple[str, int]]) -> list[Item]:
        """Decode and prepare one image at a time per request, each joining the queue as it is ready.

        One at a time, so a request of 64 large photos holds one decode thread,
        not all of them, and a small request behind it still decodes at once.
        """
        loop = asyncio.get_running_loop()
        items: list[Item] = []
        for i, image in enumerate(images):
            try:
                item = await loop.run_in_executor(self.decode_pool, prepare, self.detector, image, self.limits, self.args.fast_decode)
            except ImageError as exc:
                self.metrics.errors.inc(tags={"kind": exc.code})
                raise image_error(exc, i if len(images) > 1 else None) from None
            self.metrics.decode.observe(item.decode_s)
            self.scheduler.decode.observe(*probes[i], item.decode_s)
            self.stage_seconds["decode"] += item.decode_s
            item.queued_at = time.perf_counter()
            items.append(item)
            self.scheduler.add(ticket, i, item)
        return items

    def encode(self, items: list[Item], detections: list[Detections]) -> dict:
        from detserve.adapters.base import box_annotations

        name = self.info["name"]
        return {
            "model": {k: self.info[k] for k in ("name", "version", "backend", "device", "precision", "variant")},
            "results": [
                {
                    "width": item.width,
                    "height": item.height,
                    "frames": item.frames,
                    "annotations": box_annotations(det, self.adapter.labels, name, None),
                }
                for item, det in zip(items, detections)
            ],
        }

    # ---- Python handle API ---------------------------------------------
    async def predict(
        self,
        images: ImageInput | list[ImageInput],
        conf: float | None = None,
        iou: float | None = None,
        max_det: int | None = None,
        timeout_s: float | None = None,
    ) -> dict:
        """``handle.predict.remote(image_or_list)``: bytes, PIL images or HxWx3 uint8 arrays; same result as HTTP.

        Bad input raises ``ValueError`` with the same message the HTTP API gives;
        an overloaded server raises ``ValueError("overloaded: ...")`` at once.
        """
        batch = images if isinstance(images, list) else [images]
        try:
            return await self.detect(batch, self.detector.params(conf=conf, iou=iou, max_det=max_det), self.deadline(timeout_s))
        except ApiError as exc:
            raise ValueError(f"{exc.code}: {exc.message}") from None

    # ---- HTTP (routes, errors and OpenAPI: serve/http.py) ---------------------
    def __serve_build_asgi_app__(self):
        return build_api(self)

    def request_deadline(self, request: Request) -> tuple[float, float]:
        """(deadline, budget_s) for an HTTP request: counted from when the proxy received it."""
        timeout_s = header_timeout(request)
        return self.deadline(timeout_s, waited_since_proxy(request)), self.budget_s(timeout_s)

    def admission_header(self) -> dict[str, str]:
        """This replica's :class:`~detserve.serve.admission.Outlook`, sent with every /predict answer for the ingress."""
        outlook = self.scheduler.outlook(self.replica_tag, self.budget_s(None), time.time() - self.scheduler.clock())
        return {ADMIT_HEADER: outlook.header()}

    async def stats(self) -> dict:
        sizes = dict(sorted(self.scheduler.batch_sizes.items()))
        images = sum(k * v for k, v in sizes.items())
        me = psutil.Process()
        # pid, RSS and open file descriptors: what a soak (benchmarks/soak.py) watches for leaks.
        return {"batch_sizes": sizes, "batches": sum(sizes.values()), "images": images,
                "mean_batch_size": images / max(1, sum(sizes.values())),
                "stage_seconds": dict(self.stage_seconds),
                "scheduler": self.scheduler.stats(),
                "pid": me.pid, "rss_bytes": me.memory_info().rss, "open_fds": me.num_fds()}  # fmt: skip

    async def http_info(self) -> dict:
        m = self.detector.manifest
        return {**self.info, "labels": self.adapter.labels, "input": m.input.model_dump(), "batch": m.batch.model_dump(),
                "precision_choice": self.detector.choice.describe()}


def _replica_tag() -> str:
    """This replica's id in Serve (its pid outside Ray): the proxy sums the capacity of the replicas by it."""
    try:
        return serve.get_replica_context().replica_tag
    except Exception:  # not in a Serve replica (in-process tests)
        return f"pid{os.getpid()}"


def application(args: dict[str, Any], options: dict[str, Any] | None = None) -> serve.Application:
    """The detserve application, for code: ``args`` as in deploy.yaml, ``options`` as its ``deployments:`` entry."""
    AppArgs(**args)  # fail at deploy time, with the field name, not in the replica
    deployment = DetectionServer.options(**options) if options else DetectionServer
    return deployment.bind(args)


def build_app(args: dict[str, Any]) -> serve.Application:
    """Application builder for deploy.yaml (``import_path: detserve.serve.app:build_app``).

    Ray calls builders with exactly one argument, the application's ``args``;
    per-deployment options come from the config file's ``deployments:``.
    """
    return application(args)
