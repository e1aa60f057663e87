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
import os
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from detserve.runtime import offline

offline.apply()

import psutil  # noqa: E402
from pydantic import BaseModel, ConfigDict, Field  # noqa: E402
from ray import serve  # noqa: E402

from detserve.runtime.images import ImageError, ImageInput, Limits  # noqa: E402
from detserve.runtime.postprocess import DetectParams, Detections  # noqa: E402
from detserve.serve.batching import BatchTimings, Job, prepare, run_batch  # noqa: E402
from detserve.serve.http import ApiError, RequestLimits, build_api, image_error  # noqa: E402

log = logging.getLogger("ray.serve")

# CPU pod defaults, chosen from measurement (README, "Tuned defaults"): on CPU
# a bigger batch does not lower the cost per image, so batches stay small; no
# batch wait, because the engine-idle gate already gathers what arrives while
# a batch runs (a 5 ms wait cost 12 % of throughput at concurrency 1 and
# formed no bigger batches); max_ongoing_requests must be >= max_batch_size
# or Ray silently caps every batch at it.
DEFAULT_MAX_BATCH_SIZE = 8
DEFAULT_BATCH_WAIT_S = 0.0


class AppArgs(BaseModel):
    """``args`` of an application in deploy.yaml."""

    model_config = ConfigDict(extra="forbid")

    model: str = Field("yolo", description="export folder, or the name of a default model (yolo, fasterrcnn)")
    backend: str = "auto"
    device: str = "auto"
    threads: int = Field(1, ge=1, description="engine intra-op threads per replica")
    decode_threads: int = Field(2, ge=1)
    max_body_bytes: int = 50 * 1024 * 1024
    max_images: int = 64
    max_pixels: int = 40_000_000


class UserConfig(BaseModel):
    """``user_config`` of the deployment: changeable without restarting replicas."""

    model_config = ConfigDict(extra="forbid")

    max_batch_size: int = Field(DEFAULT_MAX_BATCH_SIZE, ge=1)
    batch_wait_timeout_s: float = Field(DEFAULT_BATCH_WAIT_S, ge=0)


def resolve_model(model: str) -> Path:
    """A default model's name -> its export folder (``detserve models`` exports them); else a path."""
    from detserve.runtime.defaults import DEFAULT_MODELS, default_folder

    if model in DEFAULT_MODELS:
        return default_folder(model)
    path = Path(model).expanduser()
    if not path.is_absolute():
        path = Path(os.environ.get("DETSERVE_ROOT", Path.cwd())) / path
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
    max_ongoing_requests=32,
    max_queued_requests=128,
    # Beyond the queue: a fast 503 that tells the client when to retry.
    backpressure_config={"status_code": 503, "retry_after_s": 1},
    health_check_period_s=10,
    health_check_timeout_s=30,
    graceful_shutdown_timeout_s=10,
    ray_actor_options={"num_cpus": 1},
    autoscaling_config={
        "min_replicas": 1,
        "initial_replicas": 1,
        "max_replicas": 2,
        "target_ongoing_requests": 16,
        "upscale_delay_s": 10,
        "downscale_delay_s": 120,
    },
)
@serve.ingress()  # the app is built per replica, around the replica: __serve_build_asgi_app__
class DetectionServer:
    def __init__(self, args: dict[str, Any] | None = None):
        from detserve.adapters import adapter_for

        self.args = AppArgs(**(args or {}))
        folder = resolve_model(self.args.model)
        self.adapter = adapter_for(folder, backend=self.args.backend, device=self.args.device, threads=self.args.threads)
        self.detector = self.adapter.detector
        self.limits = Limits(max_pixels=self.args.max_pixels, max_bytes=self.args.max_body_bytes)
        self.request_limits = RequestLimits(self.args.max_body_bytes, self.args.max_images)
        # Decode threads and one engine thread: the engine never waits on the
        # event loop, and the event loop never runs an engine.
        self.decode_pool = ThreadPoolExecutor(self.args.decode_threads, thread_name_prefix="decode")
        self.engine_pool = ThreadPoolExecutor(1, thread_name_prefix="engine")
        self.metrics = _Metrics()
        # Set while the engine is free. Ray's @serve.batch seals a batch as soon
        # as its first request arrives and only then waits for the previous
        # batch to finish (max_concurrent_batches), so under load it forms
        # batches of one that queue behind the engine. Holding new jobs here
        # while a batch runs and releasing them together when it ends lets the
        # batch queue take everything that arrived meanwhile (as Triton does).
        self.engine_idle = asyncio.Event()
        self.engine_idle.set()
        # Batch sizes actually formed, for /stats (tests and benchmarks read it).
        self.batch_sizes: collections.Counter[int] = collections.Counter()
        # Seconds spent per stage, summed over all images/batches (for /stats).
        self.stage_seconds: collections.Counter[str] = collections.Counter()
        self.detector.warmup()
        self.info = self.detector.describe()
        log.info("detserve replica ready: %s", self.info)

    def reconfigure(self, user_config: dict) -> None:
        config = UserConfig(**(user_config or {}))
        self.batched.set_max_batch_size(config.max_batch_size)
        self.batched.set_batch_wait_timeout_s(config.batch_wait_timeout_s)

    async def check_health(self) -> None:
        """Healthy when the engine still answers a tiny image."""
        loop = asyncio.get_running_loop()
        await asyncio.wait_for(loop.run_in_executor(self.engine_pool, self.detector.warmup), timeout=20)

    # ---- the batch -----------------------------------------------------
    @serve.batch(max_batch_size=DEFAULT_MAX_BATCH_SIZE, batch_wait_timeout_s=DEFAULT_BATCH_WAIT_S)
    async def batched(self, jobs: list[Job]) -> list[Detections | Exception]:
        loop = asyncio.get_running_loop()
        timings = BatchTimings()
        self.engine_idle.clear()
        try:
            results = await loop.run_in_executor(self.engine_pool, run_batch, self.detector, jobs, timings)
        finally:
            self.engine_idle.set()
        self.batch_sizes[timings.size] += 1
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
    async def detect(self, images: list[ImageInput], params: DetectParams) -> dict:
        """decode -> preprocess (threads) -> batch (engine) -> postprocess -> annotations."""
        loop = asyncio.get_running_loop()
        prepared = await asyncio.gather(
            *(loop.run_in_executor(self.decode_pool, prepare, self.detector, image, params, self.limits) for image in images),
            return_exceptions=True,
        )
        for i, job in enumerate(prepared):
            if isinstance(job, ImageError):
                self.metrics.errors.inc(tags={"kind": job.code})
                raise image_error(job, i if len(images) > 1 else None)
            if isinstance(job, BaseException):
                raise job
        for job in prepared:
            self.metrics.decode.observe(job.decode_s)
            self.stage_seconds["decode"] += job.decode_s
            job.enqueued_at = time.perf_counter()
        detections = await asyncio.gather(*(self.submit(job) for job in prepared))
        for det in detections:
            if isinstance(det, Exception):
                self.metrics.errors.inc(tags={"kind": "engine"})
                raise ApiError(500, "inference_failed", f"the model failed on this image: {det}")
        self.metrics.images.inc(len(detections))
        start = time.perf_counter()
        body = await loop.run_in_executor(self.decode_pool, self.encode, prepared, detections)  # off the event loop
        self.stage_seconds["encode"] += time.perf_counter() - start
        return body

    async def submit(self, job: Job) -> Detections | Exception:
        """Into the batch queue once the engine is free (see ``engine_idle``)."""
        await self.engine_idle.wait()
        return await self.batched(job)

    def encode(self, jobs: list[Job], detections: list[Detections]) -> dict:
        from detserve.adapters.base import to_collection

        name = self.info["name"]
        return {
            "model": {k: self.info[k] for k in ("name", "version", "backend", "device")},
            "results": [
                {
                    "width": job.width,
                    "height": job.height,
                    "frames": job.frames,
                    "annotations": to_collection(det, self.adapter.labels, name, None).to_json()["annotations"],
                }
                for job, det in zip(jobs, detections)
            ],
        }

    # ---- Python handle API ---------------------------------------------
    async def predict(
        self, images: ImageInput | list[ImageInput], conf: float | None = None, iou: float | None = None, max_det: int | None = None
    ) -> dict:
        """``handle.predict.remote(image_or_list)``: bytes, PIL images or HxWx3 uint8 arrays; same result as HTTP.

        Bad input raises ``ValueError`` with the same message the HTTP API gives.
        """
        batch = images if isinstance(images, list) else [images]
        try:
            return await self.detect(batch, self.detector.params(conf=conf, iou=iou, max_det=max_det))
        except ApiError as exc:
            raise ValueError(f"{exc.code}: {exc.message}") from None

    # ---- HTTP (routes, errors and OpenAPI: serve/http.py) ---------------------
    def __serve_build_asgi_app__(self):
        return build_api(self)

    async def stats(self) -> dict:
        sizes = dict(sorted(self.batch_sizes.items()))
        images = sum(k * v for k, v in sizes.items())
        return {"batch_sizes": sizes, "batches": sum(sizes.values()), "images": images,
                "mean_batch_size": images / max(1, sum(sizes.values())),
                "stage_seconds": dict(self.stage_seconds),
                "rss_bytes": psutil.Process().memory_info().rss}  # fmt: skip

    async def http_info(self) -> dict:
        m = self.detector.manifest
        return {**self.info, "labels": self.adapter.labels, "input": m.input.model_dump(), "batch": m.batch.model_dump()}


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
