"""The Ray Serve deployment: a served model behind admission by deadline and fair batches, over HTTP and handles.

Request path, one stage per line (see ``Replica.detect``):

    admit --> model.prepare (decode threads) --> fair batches (serve/scheduler.py)
          --> model.predict (engine lanes) --> model.encode --> the answer

The model is a :class:`~detserve.serve.contract.ServingContract`: an export
folder on detserve's engines (``ExportedModel``), or a user's own Dataloop
adapter folder (``serve.adapter_model.AdapterModel``). The deployment owns
HTTP, admission, batching, metrics and scaling, and never knows which.
Decoding runs in worker threads while an engine lane runs the previous batch,
so the two overlap.

``Replica`` is the plain class; ``DetectionServer`` is Serve's deployment of it
(tests and in-process code build ``Replica`` directly, without Ray).
``build_app(args)`` is the import path for ``deploy.yaml`` (exported models),
``build_adapter_app(args)`` the one for adapter folders (deploy-adapter.yaml);
the defaults here are for a CPU pod and are overridden per application there.
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

from detserve.adapters.dataloop_app import ClusterSize, ReplicaPlan  # noqa: E402
from detserve.runtime.images import ImageError, ImageInput, Limits, admission_size  # noqa: E402
from detserve.serve.admission import (  # noqa: E402
    ADMIT_HEADER, ANSWER_BEFORE_TIMEOUT_S, REFUSED_BY_HEADER, DecodeCost, RequestCost, request_budget_s, retry_after_header,
)  # fmt: skip
from detserve.serve import client_deadline, protocol  # noqa: E402
from detserve.serve.arrival import RECEIVED_AT_HEADER  # noqa: E402
from detserve.serve.batching import BatchTimings, Item  # noqa: E402
from detserve.serve.contract import ExportedModel, ServingContract  # noqa: E402
from detserve.serve.http import RequestLimits, build_api, image_error  # noqa: E402
from detserve.serve.scheduler import Overloaded, Scheduler, Settings, measure_curve, probe_sizes  # noqa: E402

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
                              "(letterbox models; boxes can differ slightly from the exact path: docs/scheduler.md, 'Fast decode')")
    precision: Literal["fp32", "int8", "auto"] = Field(
        "fp32", description="fp32: the exact export; int8: its gated int8 variant; auto: the fastest variant whose accuracy gate "
        "passed, timed at start on this machine (docs/precision.md)")  # fmt: skip


class AdapterArgs(AppArgs):
    """``args`` of an adapter application (``import_path: detserve.serve.app:build_adapter_app``).

    ``backend``, ``device``, ``threads`` and ``fast_decode`` apply to the accelerated export only;
    the adapter as written runs as its own code decides.
    """

    adapter: str = Field(description="the adapter's folder: dataloop.json, the module it names, the model's artifacts")
    model: str | None = Field(None, description="a components.models[].name of dataloop.json; default: its only model")
    accelerated: bool = Field(False, description="serve the export `detserve export --adapter` made of the adapter's weights")
    export: str | None = Field(None, description="that export's folder; default: <adapter>/detserve-export/<model>")


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

#: The client's own deadline, in seconds (Ray honours the same header for its own timer).
DEADLINE_HEADER = protocol.TIMEOUT_HEADER


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


def header_timeout(request: Request, max_s: float) -> float | None:
    """The client's deadline from the ``x-request-timeout-seconds`` header (None without one); raises the 422 of
    a value that cannot be used, as the ingress does (serve/client_deadline.py)."""
    return client_deadline.deadline_s(dict(request.headers.raw), max_s)


def images_text(n: int) -> str:
    return f"{n} image" if n == 1 else f"{n} images"


def resolve_model(model: str) -> Path:
    """A default model's name -> its export folder (``detserve models`` exports them); else a path."""
    from detserve.runtime.defaults import DEFAULT_MODELS, default_folder

    if model in DEFAULT_MODELS:
        return default_folder(model)
    return resolve_path(model)


def resolve_path(path: str) -> Path:
    """A folder named in args: relative ones are from where ``detserve serve`` ran (``DETSERVE_ROOT``), as in every replica."""
    folder = Path(path).expanduser()
    if not folder.is_absolute():
        from detserve.runtime.paths import root

        folder = root() / folder
    return folder


def app_args(args: dict[str, Any]) -> AppArgs:
    """``args`` of an application, checked: an adapter application's when they name an ``adapter`` folder."""
    return AdapterArgs(**args) if "adapter" in args else AppArgs(**args)


def serving_model(args: AppArgs) -> ServingContract:
    """The model an application serves, not yet set up: an export folder, an adapter folder, or an adapter's export."""
    if isinstance(args, AdapterArgs):
        folder = resolve_path(args.adapter)
        if not args.accelerated:
            from detserve.serve.adapter_model import AdapterModel

            return AdapterModel(folder, args.model)
        from detserve.adapters.dataloop_app import export_folder, read_app

        app = read_app(folder)
        model = app.model(args.model)
        export = resolve_path(args.export) if args.export else export_folder(app, model)
        return ExportedModel(export, backend=args.backend, device=args.device, threads=args.threads, fast_decode=args.fast_decode,
                             precision=args.precision, name=model.name)  # fmt: skip
    return ExportedModel(resolve_model(args.model), backend=args.backend, device=args.device, threads=args.threads,
                         fast_decode=args.fast_decode, precision=args.precision)  # fmt: skip


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


class Replica:
    """One replica of a detserve application, without Ray: a served model (``self.model``) behind admission,
    fair batches, HTTP and the handle API. ``DetectionServer`` deploys it; tests build it directly.

    What ``build_api`` (serve/http.py) needs of it is ``http.ApiServer``.
    """

    def __init__(self, args: dict[str, Any] | None = None):
        from detserve.serve.replica_grpc import bind_to_node_address

        bind_to_node_address()  # in a Serve replica: before Serve starts its gRPC server (serve/replica_grpc.py)
        self.args = app_args(args or {})
        self.model = serving_model(self.args)
        self.model.setup()
        self.limits = Limits(max_pixels=self.args.max_pixels, max_bytes=self.args.max_body_bytes)
        self.request_limits = RequestLimits(self.args.max_body_bytes, self.args.max_images)
        lanes, express = self.args.lanes or replica_cpus(), self.args.express_lane
        if self.model.predict_threads is not None:  # a model whose predict may not run on more threads than this
            lanes = min(lanes, self.model.predict_threads)
            express = express and lanes < self.model.predict_threads
        # Cores accounted for: ``lanes`` engine calls at once (one intra-op thread
        # each by default) plus decode threads that fill the gaps between them. The
        # express lane's thread runs only beside a large request's batches, one small batch at a time.
        settings = Settings(lanes=lanes, express=express, max_batch_size=min(DEFAULT_MAX_BATCH_SIZE, self.model.max_batch))
        self.decode_pool = ThreadPoolExecutor(self.args.decode_threads or lanes + 1, thread_name_prefix="decode")
        self.engine_pool = ThreadPoolExecutor(lanes + settings.express, thread_name_prefix="engine")
        self.metrics = _Metrics()
        self.stage_seconds: collections.Counter[str] = collections.Counter()
        self.info = self.model.summary()
        self.scheduler = Scheduler(self._run_batch, settings, executor=self.engine_pool)
        self._measure_cost_curve()
        self.scheduler.decode = self._measure_decode()
        self.replica_tag = _replica_tag()
        log.info("detserve replica ready: %s, %s", self.info, self.scheduler.stats())

    def _measure_cost_curve(self) -> None:
        """Time the model's predict at each batch size up to the cap, on an image of its full input size."""
        sample, params = self.model.sample(), self.model.params()
        cap = min(self.scheduler.settings.max_batch_size, self.model.max_batch)
        self.scheduler.curve = measure_curve(lambda n: self.model.predict([sample] * n, [params] * n, BatchTimings()), probe_sizes(cap))

    def _measure_decode(self) -> DecodeCost:
        """Time the model's prepare per megapixel for JPEG and PNG, on a photo-like image (admission by pixels)."""
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
            seconds = min(self.model.prepare(data, Limits()).decode_s for _ in range(2))
            cost.observe(fmt, side * side, seconds)
        return cost

    def reconfigure(self, user_config: dict) -> None:
        config = UserConfig(**(user_config or {}))
        settings = self.scheduler.settings
        cap = min(config.max_batch_size, self.model.max_batch)
        remeasure = cap > max(self.scheduler.curve.seconds, default=0)
        settings.max_batch_size = cap
        settings.batch_wait_s = config.batch_wait_timeout_s
        settings.policy = config.batch_policy
        if remeasure:
            self._measure_cost_curve()

    async def check_health(self) -> None:
        """Healthy when the model's own check passes (an exported model: its engine still answers a tiny image)."""
        loop = asyncio.get_running_loop()
        await asyncio.wait_for(loop.run_in_executor(self.engine_pool, self.model.check), timeout=20)

    # ---- the batch (engine thread) --------------------------------------
    def _run_batch(self, items: list[Item], params: list[Any]) -> list[Any]:
        timings = BatchTimings()
        results = self.model.predict(items, params, timings)
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
        sizes = [admission_size(image) for image in images]
        decode = self.scheduler.decode
        return RequestCost(len(images), sum(decode.predict(fmt, px) for fmt, px in sizes), sum(px for _, px in sizes)), sizes

    async def detect(self, images: list[ImageInput], params: Any, deadline: float, budget_s: float | None = None) -> dict:
        """admit (by images and pixels) -> prepare (decode threads) -> fair batches -> predict (engine lanes) -> encode."""
        cost, sizes = self.request_cost(images)
        try:
            ticket = self.scheduler.admit(cost, deadline, params, budget_s)
        except Overloaded as exc:
            self.metrics.errors.inc(tags={"kind": "overloaded"})
            if exc.hopeless:
                raise protocol.error("deadline_too_short", f"{exc.reason} ({self._deadline_text(budget_s)}, less {ANSWER_BEFORE_TIMEOUT_S:g} s "
                                     f"for the answer's way back): give a longer {DEADLINE_HEADER}, or fewer or smaller images") from None
            raise protocol.error(
                "overloaded",
                protocol.overloaded_message(exc.reason, retry_after_header(exc.retry_after_s)),
                headers={"Retry-After": retry_after_header(exc.retry_after_s), REFUSED_BY_HEADER: "replica"},
            ) from None  # fmt: skip
        reason = None
        try:
            # The whole answer, decode included, is bounded by the deadline (monotonic = the loop's clock).
            async with asyncio.timeout_at(deadline):
                items = await self._prepare_all(ticket, images, sizes)
                detections = await self.scheduler.wait(ticket)
        except TimeoutError:
            reason = "deadline"
            self.metrics.errors.inc(tags={"kind": "deadline"})
            raise protocol.error(
                "deadline_exceeded",
                f"the request ({images_text(len(images))}) was not answered within {self._deadline_text(budget_s)}; "
                f"its images not yet run were dropped ({self.scheduler.outstanding} others queued): retry, "
                f"or give a longer {DEADLINE_HEADER} header",
            ) from None  # fmt: skip
        except asyncio.CancelledError:
            reason = "cancelled"  # the client went away: what has not run is dropped
            raise
        finally:
            self.scheduler.release(ticket, reason)
        for i, det in enumerate(detections):
            if isinstance(det, Exception):
                self.metrics.errors.inc(tags={"kind": "engine"})
                where = f"image {i}: " if len(detections) > 1 else ""
                code = getattr(det, "code", "inference_failed")  # a served adapter's PredictionError names its own
                raise protocol.error(code, f"{where}the model failed on this image: {det}")
        self.metrics.images.inc(len(detections))
        start = time.perf_counter()
        if sum(map(self.model.boxes, detections)) <= INLINE_ENCODE_BOXES:
            body = self.model.encode(items, detections)
        else:  # off the loop: other requests go on meanwhile
            body = await asyncio.get_running_loop().run_in_executor(self.decode_pool, self.model.encode, items, detections)
        self.stage_seconds["encode"] += time.perf_counter() - start
        return body

    async def _prepare_all(self, ticket, images: list[ImageInput], sizes: list[tuple[str, int]]) -> list[Item]:
        """Decode and prepare one image at a time per request, each joining the queue as it is ready.

        One at a time, so a request of 64 large photos holds one decode thread,
        not all of them, and a small request behind it still decodes at once.
        """
        loop = asyncio.get_running_loop()
        items: list[Item] = []
        for i, image in enumerate(images):
            try:
                item = await loop.run_in_executor(self.decode_pool, self.model.prepare, image, self.limits)
            except ImageError as exc:
                self.metrics.errors.inc(tags={"kind": exc.code})
                raise image_error(exc, i if len(images) > 1 else None) from None
            self.metrics.decode.observe(item.decode_s)
            self.scheduler.decode.observe(*sizes[i], item.decode_s)
            self.stage_seconds["decode"] += item.decode_s
            item.queued_at = time.perf_counter()
            items.append(item)
            self.scheduler.add(ticket, i, item)
        return items

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

        Errors raise the HTTP API's exceptions (serve/protocol.py: ``BadImage``, ``TooLarge``,
        ``Overloaded`` at once when the server is busy, ``DeadlineExceeded`` ...), with the same
        ``code`` and message; all are ``DetserveError``, a ``ValueError``. ``timeout_s`` is checked
        as the ``x-request-timeout-seconds`` header is.
        """
        batch = images if isinstance(images, list) else [images]
        timeout_s = protocol.client_timeout_s(timeout_s, self.args.request_timeout_s, name="timeout_s")
        return await self.detect(batch, self.params(conf, iou, max_det), self.deadline(timeout_s), self.budget_s(timeout_s))

    # ---- HTTP (routes, errors and OpenAPI: serve/http.py) ---------------------
    def __serve_build_asgi_app__(self):
        return build_api(self)

    def params(self, conf: float | None = None, iou: float | None = None, max_det: int | None = None) -> Any:
        """One request's settings, as the model takes them."""
        return self.model.params(conf=conf, iou=iou, max_det=max_det)

    def request_deadline(self, request: Request) -> tuple[float, float]:
        """(deadline, budget_s) for an HTTP request: counted from when the proxy received it."""
        timeout_s = header_timeout(request, self.args.request_timeout_s)
        return self.deadline(timeout_s, waited_since_proxy(request)), self.budget_s(timeout_s)

    def _deadline_text(self, budget_s: float | None) -> str:
        """The deadline a request had, in the client's numbers: its header's, or the server's request timeout."""
        server = self.args.request_timeout_s
        if budget_s is not None and budget_s < self.budget_s(None):  # the client asked for less than the server's
            return f"the {budget_s + ANSWER_BEFORE_TIMEOUT_S:g} s its {DEADLINE_HEADER} gave"
        return f"the server's request timeout of {server:g} s"

    def admission_header(self) -> dict[str, str]:
        """This replica's :class:`~detserve.serve.admission.Outlook`, sent with every /predict answer for the ingress."""
        outlook = self.scheduler.outlook(self.replica_tag, self.budget_s(None), time.time() - self.scheduler.clock(),
                                         self.args.request_timeout_s)  # fmt: skip
        return {ADMIT_HEADER: outlook.header()}

    async def stats(self) -> dict:
        sizes = dict(sorted(self.scheduler.batch_sizes.items()))
        images = sum(k * v for k, v in sizes.items())
        me = psutil.Process()
        # pid, RSS and open file descriptors: what a soak (benchmarks/soak.py) watches for leaks.
        return {"batch_sizes": sizes, "batches": sum(sizes.values()), "images": images,
                "mean_batch_size": images / max(1, sum(sizes.values())),
                "stage_seconds": dict(self.stage_seconds),
                "scheduler": self.scheduler.stats(), **self.model.stats(),
                "pid": me.pid, "rss_bytes": me.memory_info().rss, "open_fds": me.num_fds()}  # fmt: skip

    async def http_info(self) -> dict:
        return self.model.describe()


#: Serve's deployment of ``Replica``; the app is built per replica, around the replica (``__serve_build_asgi_app__``).
DetectionServer = serve.deployment(
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
)(serve.ingress()(Replica))


def _replica_tag() -> str:
    """This replica's id in Serve (its pid outside Ray): the proxy sums the capacity of the replicas by it."""
    try:
        return serve.get_replica_context().replica_tag
    except Exception:  # not in a Serve replica (in-process tests)
        return f"pid{os.getpid()}"


def application(args: dict[str, Any], options: dict[str, Any] | None = None) -> serve.Application:
    """The detserve application, for code: ``args`` as in deploy.yaml, ``options`` as its ``deployments:`` entry.

    An adapter application (``args`` name an ``adapter`` folder) gets its deployment options from the model's
    compute config first (:func:`adapter_plan`); ``options`` win over them.
    """
    checked = app_args(args)  # fail at deploy time, with the field name, not in the replica
    if isinstance(checked, AdapterArgs):
        options = {**adapter_plan(checked).deployment_options(), **(options or {})}
    deployment = DetectionServer.options(**options) if options else DetectionServer
    return deployment.bind(args)


def adapter_plan(args: AdapterArgs, cluster: ClusterSize | None = None, apps_sharing: int = 1) -> ReplicaPlan:
    """An adapter model's Serve settings from its compute config, capped to ``cluster`` (default: what Ray has free).

    Checks the application first, as its builder runs: the folder and model exist, and an accelerated one
    has an export that passed its check against the adapter (AppError otherwise).
    """
    from detserve.adapters.dataloop_app import AppError, accelerated_problem, export_folder, read_app, replica_plan

    app = read_app(resolve_path(args.adapter))
    model = app.model(args.model)
    if args.accelerated:
        problem = accelerated_problem(resolve_path(args.export) if args.export else export_folder(app, model))
        if problem:
            raise AppError(f"{model.name}: {problem}")
    return replica_plan(model, cluster or free_cluster(), apps_sharing)


def free_cluster() -> ClusterSize:
    """What the Ray cluster has free for new applications; outside Ray, this machine's CPUs and free memory."""
    import ray

    if ray.is_initialized():
        free = ray.available_resources()
        return ClusterSize(free.get("CPU", 0.0), free.get("memory", 0.0), free.get("GPU", 0.0))
    return ClusterSize(float(os.cpu_count() or 1), float(psutil.virtual_memory().available), 0.0)


def build_app(args: dict[str, Any]) -> serve.Application:
    """Application builder for deploy.yaml (``import_path: detserve.serve.app:build_app``).

    Ray calls builders with exactly one argument, the application's ``args``;
    per-deployment options come from the config file's ``deployments:``.
    """
    return application(args)


def build_adapter_app(args: dict[str, Any]) -> serve.Application:
    """Application builder for a Dataloop adapter folder (``import_path: detserve.serve.app:build_adapter_app``).

    ``args``: :class:`AdapterArgs` (``adapter``: the folder, ``model``: one of its models). The deployment's
    resources and autoscaling come from the model's compute config, capped to this cluster (one log line
    says so); the config file's ``deployments:`` entry still wins. deploy-adapter.yaml is an example.
    """
    plan = adapter_plan(AdapterArgs(**args))
    if plan.note:
        logging.getLogger("ray.serve").warning(plan.note)
    return DetectionServer.options(**plan.deployment_options()).bind(args)
