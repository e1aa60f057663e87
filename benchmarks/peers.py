"""Peer servers for the side-by-side: the same model and the same detserve stages behind LitServe and PyTriton.

Only the serving layer differs. Each peer wraps the same serving contract the
Serve deployment wraps (``serve.contract.ExportedModel``): its ``prepare``
(decode + letterbox), ``predict`` (join + one engine call + per-request NMS)
and ``encode`` (the same Dataloop JSON answer). Batching and workers are each
framework's own:

- LitServe: ``LitAPI(max_batch_size=8, batch_timeout=0.005)``, one inference
  worker (``workers_per_device=1``, ``accelerator="cpu"``), one uvicorn API
  server. Requests are ``multipart/form-data`` with one ``image`` file (LitServe
  parses JSON or forms; it has no raw-body request type).
- PyTriton: Triton's dynamic batcher, ``max_batch_size=8``,
  ``max_queue_delay_microseconds=5000``, one model instance; requests are
  KServe v2 ``/v2/models/detect/infer`` with the image as a binary BYTES tensor,
  the answer is one BYTES tensor holding the same JSON.

Both decode in their inference worker (that is where each framework's API puts
it), detserve in a thread pool beside its engine thread.

Each peer counts what detserve's ``/stats`` counts (batch sizes, seconds per
stage) and writes it to a JSON file after every batch, so the load generator
diffs peers exactly like detserve.

Run as a module to start one peer in the foreground (the benchmark does this in
a subprocess): ``python -m detserve.benchmarks.peers litserve --model DIR --port N --stats-file F``.
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import signal
import struct
import subprocess
import sys
import sysconfig
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from detserve.benchmarks.multipart import multipart_request  # noqa: F401  (the form a LitServe peer is sent: run.run_peer)
from detserve.benchmarks.ports import free_port
from detserve.runtime import paths


#: Exact versions the side-by-side was run with (pyproject's ``bench`` extra).
LITSERVE_PIN = "litserve==0.2.19"
#: PyTriton pins numpy<2, the project needs numpy 2: it gets its own venv (see ``setup_pytriton``).
PYTRITON_PINS = ("nvidia-pytriton==0.7.0", "pandas==2.3.3")
PYTRITON_VENV = paths.cache_dir() / "bench-pytriton"
TRITON_TOKEN_ENV = "DETSERVE_BENCH_TRITON_TOKEN"


@dataclass
class PeerConfig:
    """How a peer batches and how many workers it runs; mirrors detserve's CPU defaults."""

    model: str
    threads: int = 1  # engine intra-op threads per worker
    max_batch_size: int = 8
    batch_wait_s: float = 0.005
    workers: int = 1
    max_pixels: int = 40_000_000  # detserve's AppArgs defaults
    max_body_bytes: int = 50 * 1024 * 1024

    def describe(self, name: str) -> dict:
        info: dict[str, Any] = asdict(self)
        if name == "litserve":
            info["settings"] = (
                f"LitAPI(max_batch_size={self.max_batch_size}, batch_timeout={self.batch_wait_s}); "
                f"LitServer(accelerator='cpu', devices=1, workers_per_device={self.workers}, timeout=30); "
                "run(host='127.0.0.1', num_api_servers=1); multipart upload; decode in the worker"
            )
        else:
            info["settings"] = (
                f"ModelConfig(max_batch_size={self.max_batch_size}, "
                f"batcher=DynamicBatcher(max_queue_delay_microseconds={int(self.batch_wait_s * 1e6)})); "
                f"{self.workers} model instance(s); KServe v2 HTTP, binary BYTES input; decode in the callable"
            )
        return info


# --- what the peers run (inside the peer's process) --------------------------------


class StageCounters:
    """detserve's /stats counters, written atomically to a JSON file after each batch."""

    made = 0

    def __init__(self, path: str | None):
        # One file per worker (``<stem>.<pid>-<n>.json``); the benchmark sums them (``read_counters``).
        if path:
            StageCounters.made += 1
            base = Path(path)
            self.path: Path | None = base.with_name(f"{base.stem}.{os.getpid()}-{StageCounters.made}.json")
        else:
            self.path = None
        self.batch_sizes: dict[int, int] = {}
        self.stage_seconds: dict[str, float] = {}
        self.lock = threading.Lock()

    def add(self, stage: str, seconds: float) -> None:
        with self.lock:
            self.stage_seconds[stage] = self.stage_seconds.get(stage, 0.0) + seconds

    def batch(self, size: int) -> None:
        with self.lock:
            self.batch_sizes[size] = self.batch_sizes.get(size, 0) + 1

    def snapshot(self) -> dict:
        with self.lock:
            sizes = dict(sorted(self.batch_sizes.items()))
            images = sum(k * v for k, v in sizes.items())
            return {"batch_sizes": sizes, "batches": sum(sizes.values()), "images": images,
                    "mean_batch_size": images / max(1, sum(sizes.values())), "stage_seconds": dict(self.stage_seconds)}  # fmt: skip

    def flush(self) -> None:
        if self.path is None:
            return
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.snapshot()))
        os.replace(tmp, self.path)


class Pipeline:
    """The Serve deployment's model stages for one peer worker (``ExportedModel``), with the same counters as its replica."""

    def __init__(self, config: PeerConfig, stats_file: str | None):
        from detserve.runtime import offline

        offline.apply()
        from detserve.runtime.images import Limits
        from detserve.serve.contract import ExportedModel

        # Not serve.app.AppArgs: that imports Ray, whose protobuf gencode PyTriton's venv cannot load (serve.contract
        # imports neither Ray nor dtlpy). The benchmark fills max_pixels/max_body_bytes from AppArgs' defaults (run.peer_config).
        self.model = ExportedModel(config.model, backend="onnxruntime", device="cpu", threads=config.threads)
        self.model.setup()
        self.limits = Limits(max_pixels=config.max_pixels, max_bytes=config.max_body_bytes)
        self.params = self.model.params()
        self.counters = StageCounters(stats_file)
        self.counters.flush()

    def prepare(self, data: bytes):
        item = self.model.prepare(data, self.limits)
        self.counters.add("decode", item.decode_s)
        item.queued_at = time.perf_counter()
        return item

    def run(self, jobs: list) -> list:
        """Detections (or an exception) per job, in order: one engine call for the whole batch."""
        from detserve.serve.batching import BatchTimings

        timings = BatchTimings()
        results = self.model.predict(jobs, [self.params] * len(jobs), timings)
        self.counters.batch(timings.size)
        self.counters.add("engine", timings.engine_s)
        self.counters.add("postprocess", timings.postprocess_s)
        self.counters.add("queue_wait", sum(timings.queue_s))
        return results

    def encode(self, job, det) -> dict:
        """The body detserve answers with for one image (the contract's ``encode``)."""
        start = time.perf_counter()
        body = self.model.encode([job], [det])
        self.counters.add("encode", time.perf_counter() - start)
        return body


def serve_pytriton(config: PeerConfig, port: int, stats_file: str | None, workspace: str) -> None:
    import numpy as np
    from pytriton.model_config import DynamicBatcher, ModelConfig, Tensor
    from pytriton.triton import Triton, TritonConfig, TritonSecurityConfig

    pipelines: list[Pipeline] = []

    def make_infer():
        pipeline = Pipeline(config, stats_file)
        pipelines.append(pipeline)

        def infer(requests):
            jobs = [pipeline.prepare(bytes(request["image"].reshape(-1)[0])) for request in requests]
            results = pipeline.run(jobs)
            out = []
            for job, det in zip(jobs, results):
                if isinstance(det, Exception):
                    raise det
                body = json.dumps(pipeline.encode(job, det), separators=(",", ":")).encode()
                out.append({"result": np.array([[body]], dtype=np.object_)})
            pipeline.counters.flush()
            return out

        return infer

    grpc_port, metrics_port = free_port(), free_port()
    triton_config = TritonConfig(
        http_address="127.0.0.1",
        http_port=port,
        grpc_address="127.0.0.1",
        grpc_port=grpc_port,
        metrics_address="127.0.0.1",
        metrics_port=metrics_port,
        allow_metrics=False,
        allow_gpu_metrics=False,
        allow_cpu_metrics=False,
        exit_timeout_secs=5,
    )
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    # PyTriton guards statistics (and model-repository, ...) with a token; the benchmark
    # passes its own so that it can read Triton's queue times.
    security = TritonSecurityConfig(access_token=os.environ.get(TRITON_TOKEN_ENV) or None)
    with Triton(config=triton_config, workspace=workspace, security_config=security) as triton:
        triton.bind(
            model_name="detect",
            infer_func=[make_infer() for _ in range(config.workers)],
            inputs=[Tensor(name="image", dtype=bytes, shape=(1,))],
            outputs=[Tensor(name="result", dtype=bytes, shape=(1,))],
            config=ModelConfig(
                max_batch_size=config.max_batch_size,
                batcher=DynamicBatcher(max_queue_delay_microseconds=int(config.batch_wait_s * 1e6)),
            ),
            strict=False,
        )
        triton.run()
        print("pytriton: serving", flush=True)
        while not stop.wait(0.5):
            pass


# --- what the benchmark runs (in its own process) ------------------------------------


class PeerUnavailable(RuntimeError):
    """A peer that cannot run here; the message says exactly why."""


def triton_request(image: bytes) -> tuple[bytes, tuple[tuple[str, str], ...]]:
    """A KServe v2 infer request with one BYTES element in binary form (Triton's binary tensor extension)."""
    blob = struct.pack("<I", len(image)) + image
    header = json.dumps(
        {
            "inputs": [{"name": "image", "shape": [1, 1], "datatype": "BYTES", "parameters": {"binary_data_size": len(blob)}}],
            "outputs": [{"name": "result", "parameters": {"binary_data": False}}],
        }
    ).encode()
    headers = (("Content-Type", "application/octet-stream"), ("Inference-Header-Content-Length", str(len(header))))
    return header + blob, headers


@dataclass
class Peer:
    """A peer server running in its own process group on a loopback port."""

    name: str
    port: int
    process: subprocess.Popen
    stats_file: Path
    log_file: Path
    config: dict
    version: str
    started_s: float
    extra: dict = field(default_factory=dict)

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def read_stats(self) -> dict | None:
        """The /stats shape, summed over the peer's workers; PyTriton adds Triton's own queue time."""
        stats = read_counters(self.stats_file)
        if stats is not None and self.name == "pytriton":
            queue_s = triton_queue_seconds(self.base_url, self.extra.get("token", ""))
            if queue_s is not None:
                stats["stage_seconds"]["queue_wait"] = stats["stage_seconds"].get("queue_wait", 0.0) + queue_s
        return stats

    def tree_cpu_seconds(self) -> float | None:
        return process_tree_cpu(self.process.pid)

    def stop(self) -> list[int]:
        """SIGTERM the peer's process group, SIGKILL what is left after 15 s; returns pids that survived (should be none)."""
        return stop_group(self.process)


def read_counters(stats_file: Path) -> dict | None:
    """Sum the per-worker counter files of a peer into detserve's /stats shape (None before any exists)."""
    sizes: dict[int, int] = {}
    stages: dict[str, float] = {}
    found = False
    for path in sorted(stats_file.parent.glob(f"{stats_file.stem}.*.json")):
        try:
            data = json.loads(path.read_text())
        except (OSError, ValueError):
            continue
        found = True
        for k, v in data.get("batch_sizes", {}).items():
            sizes[int(k)] = sizes.get(int(k), 0) + int(v)
        for k, v in data.get("stage_seconds", {}).items():
            stages[k] = stages.get(k, 0.0) + float(v)
    if not found:
        return None
    images = sum(k * v for k, v in sizes.items())
    batches = sum(sizes.values())
    return {"batch_sizes": dict(sorted(sizes.items())), "batches": batches, "images": images,
            "mean_batch_size": images / max(1, batches), "stage_seconds": stages}  # fmt: skip


def triton_queue_seconds(base_url: str, token: str) -> float | None:
    """Seconds requests spent in Triton's scheduler queue (its statistics extension), summed."""
    import urllib.request

    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    request = urllib.request.Request(f"{base_url}/v2/models/detect/stats", headers={"triton-access-token": token})
    try:
        with opener.open(request, timeout=5) as response:
            data = json.loads(response.read())
        return sum(int(m["inference_stats"]["queue"]["ns"]) for m in data.get("model_stats", [])) / 1e9
    except Exception:
        return None


def process_tree_cpu(pid: int, include_self: bool = True) -> float | None:
    """User+system CPU seconds of a process and all its descendants (None if psutil cannot see it)."""
    try:
        import psutil

        root = psutil.Process(pid)
        procs = ([root] if include_self else []) + root.children(recursive=True)
        total = 0.0
        for p in procs:
            try:
                t = p.cpu_times()
                total += t.user + t.system
            except (psutil.NoSuchProcess, psutil.AccessDenied):
                pass
        return total
    except Exception:
        return None


def stop_group(process: subprocess.Popen, grace_s: float = 15.0) -> list[int]:
    """End a process started with ``process_group=0`` and everything in its process group."""
    import psutil

    pgid = process.pid  # the group leader: its pid is the group id
    members = _group_members(pgid)
    if process.poll() is None or members:
        try:
            os.killpg(pgid, signal.SIGTERM)
        except ProcessLookupError:
            pass
        deadline = time.monotonic() + grace_s
        while time.monotonic() < deadline and (process.poll() is None or _group_members(pgid)):
            time.sleep(0.2)
        if process.poll() is None or _group_members(pgid):
            try:
                os.killpg(pgid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            time.sleep(0.5)
    try:
        process.wait(timeout=5)
    except subprocess.TimeoutExpired:
        pass
    left = []
    for pid in _group_members(pgid):
        try:
            if psutil.Process(pid).status() != psutil.STATUS_ZOMBIE:
                left.append(pid)
        except psutil.NoSuchProcess:
            pass
    return left


def _group_members(pgid: int) -> list[int]:
    import psutil

    members = []
    for p in psutil.process_iter(["pid"]):
        try:
            if os.getpgid(p.info["pid"]) == pgid and p.status() != psutil.STATUS_ZOMBIE:
                members.append(p.info["pid"])
        except (ProcessLookupError, psutil.NoSuchProcess, PermissionError):
            pass
    return members


def _wait_ready(peer: Peer, path: str, timeout_s: float) -> None:
    import urllib.request

    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # never a proxy: loopback only
    deadline = time.monotonic() + timeout_s
    last = ""
    while time.monotonic() < deadline:
        if peer.process.poll() is not None:
            raise PeerUnavailable(f"{peer.name} exited with code {peer.process.returncode} while starting:\n{tail(peer.log_file)}")
        try:
            with opener.open(f"{peer.base_url}{path}", timeout=2) as response:
                if response.status == 200 and peer.read_stats() is not None:
                    return
        except Exception as exc:  # not up yet
            last = f"{type(exc).__name__}: {exc}"
        time.sleep(0.5)
    leftovers = peer.stop()
    raise PeerUnavailable(f"{peer.name} did not become ready in {timeout_s:.0f} s ({last}); leftovers {leftovers}:\n{tail(peer.log_file)}")


def tail(path: Path, lines: int = 25) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


def dist_version(dist: str, python: str | None = None) -> str:
    """The installed version of ``dist`` (in ``python``'s environment when given), or "not installed"."""
    if python is None:
        from importlib.metadata import PackageNotFoundError, version

        try:
            return version(dist)
        except PackageNotFoundError:
            return "not installed"
    out = subprocess.run([python, "-c", f"from importlib.metadata import version; print(version({dist!r}))"], capture_output=True, text=True)
    return out.stdout.strip() or "not installed"


def _peer_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    from detserve.runtime import offline

    env = dict(os.environ)
    env.update(offline.environment())
    env.update({paths.ROOT_ENV: str(paths.root()), "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"})
    env.update(extra or {})
    return env


def start_litserve(config: PeerConfig, workdir: Path, timeout_s: float = 180.0) -> Peer:
    version = dist_version("litserve")
    if version == "not installed":
        raise PeerUnavailable(f"litserve is not installed in {sys.prefix}: `{sys.executable} -m pip install {LITSERVE_PIN}`")
    return _start(
        "litserve", [sys.executable], config, workdir, timeout_s, version=f"litserve {version}", ready_path="/health", env=_peer_env()
    )


def pytriton_python() -> str | None:
    """The interpreter of PyTriton's venv: ``$DETSERVE_PYTRITON_PYTHON``, else ``.cache/bench-pytriton``."""
    configured = os.environ.get("DETSERVE_PYTRITON_PYTHON")
    if configured:
        return configured if Path(configured).is_file() else None
    python = PYTRITON_VENV / "bin" / "python"
    return str(python) if python.is_file() else None


def setup_pytriton(venv: Path = PYTRITON_VENV) -> str:
    """Create PyTriton's own venv (needs the package registry): ``python -m detserve.benchmarks --setup-peers``.

    nvidia-pytriton 0.7.0 requires numpy<2 and the project runs numpy 2, so it
    cannot share ``.venv``. Its venv holds PyTriton (and pandas 2.3, which
    dtlpy needs and which works with numpy 1.26); the peer appends ``.venv``'s
    site-packages *after* its own, so torch, onnxruntime, OpenCV and dtlpy come
    from the project's venv while numpy comes from PyTriton's.
    """
    base = getattr(sys, "_base_executable", sys.executable)
    if not (venv / "bin" / "python").is_file():
        subprocess.run([base, "-m", "venv", str(venv)], check=True)
    subprocess.run([str(venv / "bin" / "python"), "-m", "pip", "install", "-q", *PYTRITON_PINS], check=True)
    return str(venv / "bin" / "python")


def start_pytriton(config: PeerConfig, workdir: Path, timeout_s: float = 240.0) -> Peer:
    python = pytriton_python()
    if python is None:
        raise PeerUnavailable(
            "PyTriton's venv is missing: run `python -m detserve.benchmarks --setup-peers` once with the registry reachable "
            f"(it installs {' '.join(PYTRITON_PINS)} into {PYTRITON_VENV}; nvidia-pytriton pins numpy<2, so not into .venv), "
            "or point DETSERVE_PYTRITON_PYTHON at an interpreter that has it"
        )
    version = dist_version("nvidia-pytriton", python)
    if version == "not installed":
        raise PeerUnavailable(f"{python} has no nvidia-pytriton: `{python} -m pip install {' '.join(PYTRITON_PINS)}`")
    # The bundled Python backend stub links libpython3.11.so; without this it picks the
    # system's 3.11.2 library under the venv's 3.11.7 standard library and fails at model
    # load ("'_thread.RLock' object has no attribute '_recursion_count'").
    libdir = subprocess.run([python, "-c", "import sysconfig; print(sysconfig.get_config_var('LIBDIR'))"], capture_output=True, text=True).stdout.strip()
    ld = ":".join(p for p in (libdir, os.environ.get("LD_LIBRARY_PATH", "")) if p)
    workspace = workdir / "pytriton-workspace"
    token = secrets.token_urlsafe(24)
    peer = _start(
        "pytriton",
        [python],
        config,
        workdir,
        timeout_s,
        version=f"nvidia-pytriton {version}",
        ready_path="/v2/models/detect/ready",
        env=_peer_env({"LD_LIBRARY_PATH": ld, TRITON_TOKEN_ENV: token}),
        extra_args=["--site-packages", sysconfig.get_paths()["purelib"], "--workspace", str(workspace)],
        extra={"token": token},
    )
    peer.version += f" (tritonserver {triton_server_version(peer.log_file)})"
    return peer


def triton_server_version(log_file: Path) -> str:
    """The bundled tritonserver's version, from its start-up table in the peer's log."""
    import re

    match = re.search(r"server_version\s*\|\s*([0-9.]+)", tail(log_file, 400))
    return match.group(1) if match else "?"


def _start(
    name: str,
    python: list[str],
    config: PeerConfig,
    workdir: Path,
    timeout_s: float,
    *,
    version: str,
    ready_path: str,
    env: dict[str, str],
    extra_args: list[str] | None = None,
    extra: dict | None = None,
) -> Peer:
    workdir.mkdir(parents=True, exist_ok=True)
    port = free_port()
    stats_file = workdir / f"{name}-stats.json"
    for old in workdir.glob(f"{stats_file.stem}.*.json"):
        old.unlink()
    log_file = workdir / f"{name}.log"
    cmd = [
        *python, "-m", "detserve.benchmarks.peers", name,
        "--model", config.model, "--port", str(port), "--stats-file", str(stats_file),
        "--threads", str(config.threads), "--max-batch-size", str(config.max_batch_size),
        "--batch-wait-s", str(config.batch_wait_s), "--workers", str(config.workers),
        "--max-pixels", str(config.max_pixels), "--max-body-bytes", str(config.max_body_bytes),
        *(extra_args or []),
    ]  # fmt: skip
    started = time.monotonic()
    with open(log_file, "wb") as log:
        # Its own process group (so that it can be ended as a whole) but the same session: with
        # Linux autogroup scheduling CPU is shared per session under contention, and detserve
        # (Ray) and the raw engine run in this session; a new session would give a peer a share
        # of its own on a busy machine.
        process = subprocess.Popen(cmd, cwd=paths.root(), env=env, stdout=log, stderr=subprocess.STDOUT, process_group=0)
    peer = Peer(name, port, process, stats_file, log_file, config.describe(name), version, 0.0, extra or {})
    _wait_ready(peer, ready_path, timeout_s)
    peer.started_s = time.monotonic() - started
    return peer


# --- entry point of a peer process -----------------------------------------------------


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m detserve.benchmarks.peers", description="Start one peer server in the foreground.")
    parser.add_argument("peer", choices=("litserve", "pytriton"))
    parser.add_argument("--model", required=True)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--stats-file")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--max-batch-size", type=int, default=8)
    parser.add_argument("--batch-wait-s", type=float, default=0.005)
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--max-pixels", type=int, default=PeerConfig.max_pixels)
    parser.add_argument("--max-body-bytes", type=int, default=PeerConfig.max_body_bytes)
    parser.add_argument("--site-packages", help="the project's site-packages, appended after this interpreter's own (PyTriton)")
    parser.add_argument("--workspace", default=None)
    args = parser.parse_args(argv)
    if args.site_packages:
        sys.path.append(args.site_packages)
    if str(paths.root()) not in sys.path:
        sys.path.insert(0, str(paths.root()))
    config = PeerConfig(args.model, args.threads, args.max_batch_size, args.batch_wait_s, args.workers, args.max_pixels, args.max_body_bytes)
    if args.peer == "litserve":
        from detserve.benchmarks.litserve_peer import serve

        serve(config, args.port, args.stats_file)
    else:
        serve_pytriton(config, args.port, args.stats_file, args.workspace or str(Path(args.stats_file).parent / "pytriton-workspace"))


if __name__ == "__main__":
    main()
