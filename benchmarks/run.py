"""``python -m detserve.benchmarks [--quick | --full]``: the whole side-by-side, one server at a time (``--overload``: benchmarks/overload.py).

    raw engine + baseline (no server)
    -> detserve on an in-process Ray (start_ray(2), one replica): over HTTP, then through a handle
    -> detserve again with ``precision: auto`` (its gated int8 variant when that is faster here), over HTTP
    -> shutdown -> LitServe (subprocess) -> PyTriton (subprocess), both on the fp32 graph
    -> bench-results/<timestamp>/{results.json, results.md, *.png}; the markdown is printed

Every server gets the same JPEG payloads (generated scenes), the same load
points, and the same window rule (``benchmarks.loadgen``). Everything binds and
connects to 127.0.0.1; every subprocess is started in its own process group and
ended at the end, whatever happened.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import os
import platform
import sys
import time
import traceback
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Callable

from detserve.runtime import offline, paths

offline.apply()

from detserve.benchmarks import loadgen, peers, raw, report  # noqa: E402
from detserve.benchmarks import payloads as bench_payloads  # noqa: E402
from detserve.benchmarks.loadgen import ClosedLoop, OpenLoop, WindowPlan, log  # noqa: E402
from detserve.benchmarks.server import APP, end_own_children, start_detserve, stop_on_sigterm  # noqa: E402
from detserve.serve.app import DEFAULT_BATCH_WAIT_S, DEFAULT_MAX_BATCH_SIZE  # noqa: E402


#: detserve's deployment for the benchmark: the CPU defaults of serve.app, but one fixed
#: replica (no autoscaling) so that every server runs exactly one inference worker.
DETSERVE_OPTIONS: dict[str, Any] = {
    "num_replicas": 1,
    "autoscaling_config": None,
    "user_config": {"max_batch_size": DEFAULT_MAX_BATCH_SIZE, "batch_wait_timeout_s": DEFAULT_BATCH_WAIT_S},
}
#: The peers' batch window: their documented dynamic-batching setting (LitServe
#: batch_timeout, Triton max_queue_delay), the same for both.
PEER_BATCH_WAIT_S = 0.005


@dataclass
class Profile:
    name: str
    concurrency: list[int]
    open_fractions: list[float]  # open-loop rates, as fractions of detserve-http's best closed-loop images/s
    plan: WindowPlan
    raw_batch_sizes: list[int]
    raw_threads: list[int]
    raw_seconds: float
    baseline_seconds: float
    torch_batch_sizes: list[int]
    payloads: int = 32
    p99_budgets_ms: list[float] = field(default_factory=lambda: [100.0, 250.0, 500.0, 1000.0])
    handle: bool = True


QUICK = Profile(
    name="quick",
    concurrency=[1, 8],
    open_fractions=[0.7],
    plan=WindowPlan(warmup_s=2.0, window_s=2.5, max_windows=5, tolerance=0.10, max_requests=2_000, max_seconds=25.0),
    raw_batch_sizes=[1, 2, 4, 8],
    raw_threads=[1],
    raw_seconds=1.0,
    baseline_seconds=2.0,
    torch_batch_sizes=[1],
)

FULL = Profile(
    name="full",
    concurrency=[1, 2, 4, 8, 16, 32],
    open_fractions=[0.5, 0.8, 1.0],
    plan=WindowPlan(warmup_s=5.0, window_s=5.0, max_windows=10, tolerance=0.10, max_requests=20_000, max_seconds=120.0),
    raw_batch_sizes=[1, 2, 4, 8],
    raw_threads=[1, 2],
    raw_seconds=3.0,
    baseline_seconds=5.0,
    torch_batch_sizes=[1, 8],
    p99_budgets_ms=[100.0, 250.0, 500.0, 1000.0, 2000.0],
)


# --- machine and versions ------------------------------------------------------------


def machine_info() -> dict:
    model = "?"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    info = {
        "cpu_count": os.cpu_count(),
        "cpu_model": model,
        "platform": platform.platform(),
        "python": platform.python_version(),
        "loadavg_start": _loadavg(),
    }
    try:
        import psutil

        info["memory_gib"] = round(psutil.virtual_memory().total / 2**30, 1)
    except Exception:
        pass
    return info


def _loadavg() -> str | None:
    try:
        return " ".join(f"{x:.2f}" for x in os.getloadavg())
    except OSError:
        return None


def versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for dist in ("detserve", "onnxruntime", "torch", "torchvision", "ultralytics", "ray", "aiohttp", "fastapi", "uvicorn",
                 "numpy", "opencv-python", "pillow", "litserve", "psutil", "matplotlib"):  # fmt: skip
        try:
            out[dist] = version(dist)
        except PackageNotFoundError:
            out[dist] = "not installed"
    return out


# --- the model -------------------------------------------------------------------------


def resolve_model(arg: str | None, imgsz: int | None = None) -> Path:
    """``--model DIR``; else the default YOLO (``models/yolo-shapes.pt``, exported once); else a random-init yolov8n at 320 px.

    ``imgsz``: the default YOLO's weights exported at that input size instead
    (YOLO is fully convolutional: at 640 it costs what a 640 model costs, and still finds the shapes).
    """
    if arg:
        return Path(arg).resolve()
    from detserve.runtime.defaults import DEFAULT_MODELS

    if imgsz is not None:
        from detserve.export.pipeline import ExportRequest, export_model
        from detserve.runtime.manifest import ManifestError, read_manifest

        from detserve.export.defaults import has_int8, int8_gate_sets

        folder = paths.cache_dir() / "bench-models" / f"yolo-shapes-{imgsz}"
        try:
            if read_manifest(folder).input.imgsz == imgsz and has_int8(folder):
                return folder
        except ManifestError:
            pass
        log(f"exporting {DEFAULT_MODELS['yolo'].weights} at {imgsz} px, with its gated int8 variants, to {folder}")
        export_model(ExportRequest(model="yolo", weights=DEFAULT_MODELS["yolo"].weights, out=folder, imgsz=imgsz, force=True, quiet=True,
                                   **int8_gate_sets()))  # fmt: skip
        return folder
    if DEFAULT_MODELS["yolo"].weights.is_file():
        from detserve.export.defaults import ensure_default_models

        return ensure_default_models(("yolo",), quiet=True, int8=True)["yolo"]
    folder = paths.cache_dir() / "bench-models" / "yolov8n-320-random"
    from detserve.runtime.manifest import ManifestError, read_manifest

    try:
        read_manifest(folder)
        return folder
    except ManifestError:
        pass
    log(f"default weights {DEFAULT_MODELS['yolo'].weights} missing: exporting a random-init yolov8n (320 px) to {folder} (fine for timing)")
    from detserve.export.pipeline import ExportRequest, export_model

    export_model(ExportRequest(model="yolo", weights=Path("yolov8n.yaml"), out=folder, imgsz=320, force=True, quiet=True))
    return folder


def model_info(folder: Path) -> dict:
    """The model's identity, and the mAP of each of its variants from the export's accuracy gate (``map``)."""
    from detserve.runtime.manifest import exact_variant_name, read_manifest

    m = read_manifest(folder)
    accuracy = {}
    for v in m.variants:
        val = v.gate.val if v.gate else None
        if val is not None:
            accuracy.setdefault(exact_variant_name(m), {"map50_95": val.reference_map50_95, "map50": val.reference_map50, "on": val.source})
            accuracy[v.name] = {"map50_95": val.map50_95, "map50": val.map50, "on": val.source, "gate_passed": v.gate.passed}
    return {"folder": str(folder), "name": m.name, "family": m.family, "imgsz": m.input.imgsz, "batch_max": m.batch.max,
            "source": m.source.file, "artifact_sha256": m.artifact_sha256[:12], "map": accuracy}  # fmt: skip


def has_cpu_variant(folder: Path) -> bool:
    """Whether ``precision: auto`` has a gated CPU variant to choose from in ``folder``."""
    from detserve.runtime import variants
    from detserve.runtime.manifest import read_manifest

    return len(variants.candidates(read_manifest(folder), "cpu")) > 1


# --- servers ---------------------------------------------------------------------------


def load_shapes(profile: Profile) -> list[ClosedLoop | OpenLoop]:
    return [ClosedLoop(c) for c in profile.concurrency]


def open_shapes(profile: Profile, reference_images_per_s: float | None) -> list[OpenLoop]:
    if not reference_images_per_s:
        return []
    return [OpenLoop(rate=round(f * reference_images_per_s, 1), seed=i) for i, f in enumerate(profile.open_fractions) if f > 0]


def detserve_requests(payloads: list[bytes]) -> list[loadgen.HttpRequest]:
    return [loadgen.HttpRequest(f"/{APP}/predict", p, (("Content-Type", "image/jpeg"),)) for p in payloads]


def run_detserve(folder: Path, payloads: list[bytes], profile: Profile, results: dict, lanes: int = 1, direct: bool = False,
                 precision: str = "fp32", name: str = "detserve") -> None:  # fmt: skip
    """detserve on an in-process Ray: HTTP points, then handle points, then shutdown.

    ``lanes``: engine calls at once in each replica (``DETSERVE_OPTIONS["num_replicas"]``); replicas x lanes = each peer's workers.
    ``direct``: also measure HTTP straight to the replica (Ray's direct ingress), without the proxy process.
    ``precision``: the application's ``precision`` arg; ``name``: the servers' prefix (``<name>-http``). Only the
    fp32 run sets the open-loop reference rate and measures the handle and direct ingress; the others reuse its rates.
    """
    from detserve.serve.run import shutdown

    if direct:
        os.environ["RAY_SERVE_ENABLE_DIRECT_INGRESS"] = "1"  # before Ray starts: its processes inherit it
    first = precision == "fp32"

    config = {
        "args": {"model": str(folder), "threads": 1, "lanes": lanes, "precision": precision},
        "options": DETSERVE_OPTIONS,
        "ray": "start_ray(2): num_cpus=2, replica num_cpus=1, proxy on 127.0.0.1",
        "settings": f"{DETSERVE_OPTIONS['num_replicas']} replica(s), each {lanes} engine lane(s) + {lanes + 1} decode threads, the scheduler's measured batch policy (cap "
        f"{DEFAULT_MAX_BATCH_SIZE}, batch_wait_timeout_s={DEFAULT_BATCH_WAIT_S}), admission by deadline; raw image/jpeg body",
    }
    began = time.monotonic()
    try:
        base, config["logging_config"] = start_detserve(config["args"], DETSERVE_OPTIONS)
        config["start_s"] = round(time.monotonic() - began, 1)
        info = _get_json(f"{base}/{APP}/info")
        config["variant"], config["precision_choice"] = info.get("variant", "fp32"), info.get("precision_choice")
        log(f"{name} up on {base}/{APP} in {config['start_s']} s, running variant {config['variant']}")

        def server_cpu() -> float | None:  # every Ray process: GCS, raylet, controller, proxy, replica
            return peers.process_tree_cpu(os.getpid(), include_self=False)

        shapes = load_shapes(profile)
        server = f"{name}-http"
        http = results["servers"][server] = {"kind": "http", "config": config, "variant": config["variant"], "points": []}
        points = asyncio.run(
            loadgen.measure_http(server, base, detserve_requests(payloads), shapes, profile.plan,
                                 stats_url=f"{base}/{APP}/stats", server_cpu=server_cpu, log=log)  # fmt: skip
        )
        http["points"] = [p.to_dict() for p in points]
        if first:
            results["config"]["open_loop_reference_images_per_s"] = max((p.images_per_s for p in points), default=None)
        opens = open_shapes(profile, results["config"].get("open_loop_reference_images_per_s"))
        if opens:
            more = asyncio.run(
                loadgen.measure_http(server, base, detserve_requests(payloads), opens, profile.plan,
                                     stats_url=f"{base}/{APP}/stats", server_cpu=server_cpu, log=log)  # fmt: skip
            )
            http["points"] += [p.to_dict() for p in more]
        if direct and first:
            replica = _direct_ingress_base()
            direct_config = dict(config, settings=config["settings"] + f"; HTTP straight to the replica's own server ({replica}): "
                                 "Ray's direct ingress (RAY_SERVE_ENABLE_DIRECT_INGRESS=1), no proxy process in the path")  # fmt: skip
            entry = results["servers"]["detserve-direct"] = {"kind": "http", "config": direct_config, "points": []}
            entry["points"] = [p.to_dict() for p in asyncio.run(
                loadgen.measure_http("detserve-direct", replica, detserve_requests(payloads), shapes + opens, profile.plan,
                                     stats_url=f"{replica}/{APP}/stats", server_cpu=server_cpu, log=log)  # fmt: skip
            )]
        if profile.handle and first:
            handle_config = dict(config, settings=config["settings"] + "; DeploymentHandle.predict.remote(bytes) from the driver")
            entry = results["servers"]["detserve-handle"] = {"kind": "handle", "config": handle_config, "points": []}
            entry["points"] = [p.to_dict() for p in asyncio.run(_measure_handle(base, payloads, shapes + opens, profile.plan, server_cpu))]
    finally:
        shutdown()


def _get_json(url: str) -> dict:
    import json
    import urllib.request

    loadgen.require_loopback(url)
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    with opener.open(url, timeout=30) as response:
        return json.loads(response.read())


def _direct_ingress_base(first: int = 30000, last: int = 30100) -> str:
    """The replica's own HTTP server under direct ingress: Ray allocates it a port from 30000 up."""
    import httpx

    for port in range(first, last):
        try:
            if httpx.get(f"http://127.0.0.1:{port}/{APP}/info", timeout=1).status_code == 200:
                return f"http://127.0.0.1:{port}"
        except httpx.HTTPError:
            continue
    raise RuntimeError(f"no replica answers /{APP}/info on 127.0.0.1:{first}-{last}: direct ingress did not start")


async def _measure_handle(base: str, payloads: list[bytes], shapes, plan: WindowPlan, server_cpu) -> list[loadgen.PointResult]:
    from ray import serve

    handle = serve.get_app_handle(APP)

    async def send(i: int) -> loadgen.Status:
        await handle.predict.remote(payloads[i % len(payloads)])
        return 200

    out = []
    async with loadgen.http_session(4, plan.request_timeout_s) as session:
        stats = loadgen.http_stats(session, f"{base}/{APP}/stats")  # the same (only) replica
        for shape in shapes:
            out.append(await loadgen.measure("detserve-handle", send, shape, plan, stats=stats, server_cpu=server_cpu, log=log))
    return out


def run_peer(name: str, folder: Path, payloads: list[bytes], profile: Profile, results: dict, workdir: Path, peer_workers: int) -> None:
    """Start one peer, measure it like detserve, stop it (and check that nothing it started is left)."""
    from detserve.serve.app import AppArgs

    defaults = AppArgs()
    config = peers.PeerConfig(model=str(folder), threads=1, max_batch_size=DETSERVE_OPTIONS["user_config"]["max_batch_size"],
                              batch_wait_s=PEER_BATCH_WAIT_S, workers=peer_workers,
                              max_pixels=defaults.max_pixels, max_body_bytes=defaults.max_body_bytes)  # fmt: skip
    info = results["peers"][name] = {"status": "starting", "config": config.describe(name)}
    try:
        peer = (peers.start_litserve if name == "litserve" else peers.start_pytriton)(config, workdir)
    except peers.PeerUnavailable as exc:
        info.update(status="unavailable", reason=str(exc))
        log(f"{name}: unavailable: {str(exc).splitlines()[0]}")
        return
    info.update(version=peer.version, start_s=round(peer.started_s, 1), log=str(peer.log_file))
    log(f"{name} ({peer.version}) up on {peer.base_url} in {peer.started_s:.1f} s")
    try:
        if name == "litserve":
            requests = [loadgen.HttpRequest("/predict", *peers.multipart_request(p)) for p in payloads]
        else:
            requests = [loadgen.HttpRequest("/v2/models/detect/infer", *peers.triton_request(p)) for p in payloads]

        async def stats() -> dict | None:
            return await asyncio.to_thread(peer.read_stats)

        shapes = load_shapes(profile) + open_shapes(profile, results["config"].get("open_loop_reference_images_per_s"))
        points = asyncio.run(loadgen.measure_http(name, peer.base_url, requests, shapes, profile.plan, stats=stats,
                                                  server_cpu=peer.tree_cpu_seconds, log=log))  # fmt: skip
        results["servers"][name] = {"kind": "http", "config": info["config"], "variant": "fp32", "points": [p.to_dict() for p in points]}
        info["status"] = "ran"
    finally:
        left = peer.stop()
        if left:
            info["leftover_pids"] = left
            results["errors"][f"{name}-cleanup"] = f"processes left after SIGKILL: {left}"


# --- the run -------------------------------------------------------------------------


def run(profile: Profile, *, model: str | None, out_root: Path, only: list[str] | None, peer_workers: int = 1,
        imgsz: int | None = None, photos: bool = False, direct: bool = False) -> tuple[dict, dict]:  # fmt: skip
    stamp = dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    outdir = out_root / stamp
    outdir.mkdir(parents=True, exist_ok=True)
    results: dict[str, Any] = {
        "schema": 1,
        "profile": profile.name,
        "created": dt.datetime.now().astimezone().isoformat(timespec="seconds"),
        "machine": machine_info(),
        "versions": versions(),
        "config": {**asdict(profile), "detserve_options": DETSERVE_OPTIONS, "peer_workers": peer_workers, "only": only},
        "servers": {},
        "peers": {},
        "raw": [],
        "errors": {},
    }
    wanted = set(only or ("raw", "detserve", "litserve", "pytriton"))
    if "detserve" in wanted:
        wanted.add("detserve-int8")  # beside fp32, when the model has a gated int8 variant
    began = time.monotonic()

    def stage(name: str, fn: Callable[[], None]) -> None:
        if name not in wanted:
            return
        log(f"== {name}")
        t = time.monotonic()
        try:
            fn()
        except Exception as exc:
            results["errors"][name] = f"{type(exc).__name__}: {exc}"
            log(f"{name} failed: {type(exc).__name__}: {exc}")
            traceback.print_exc()
        results.setdefault("stage_seconds", {})[name] = round(time.monotonic() - t, 1)

    folder = resolve_model(model, imgsz)
    results["model"] = model_info(folder)
    if photos:
        payloads = bench_payloads.photo_payloads(profile.payloads)
        source = f"generated scenes resized to photo sizes {bench_payloads.PHOTO_SIZES} in turn, JPEG q90"
    else:
        payloads = bench_payloads.jpeg_payloads(profile.payloads)
        source = "detserve.training.synthetic.scenes(n, seed=7) as JPEG q90, 200-480 px sides"
    results["config"]["payloads"] = {"count": len(payloads), "mean_bytes": sum(map(len, payloads)) // len(payloads), "source": source}

    def do_raw() -> None:
        results["raw"] += raw.engine_rows(folder, payloads, batch_sizes=profile.raw_batch_sizes, threads=profile.raw_threads,
                                          seconds=profile.raw_seconds, log=log)  # fmt: skip
        results["raw"] += raw.ceiling_rows(folder, payloads, processes=max(2, peer_workers), seconds=3 * profile.raw_seconds + 2, log=log)
        results["raw"] += raw.baseline_rows(folder, payloads, seconds=profile.baseline_seconds, log=log)
        results["raw"] += raw.torch_backend_rows(folder, payloads, batch_sizes=profile.torch_batch_sizes, seconds=profile.raw_seconds, log=log)
        if has_cpu_variant(folder):
            results["precision_table"] = raw.precision_table(folder, batch_sizes=profile.raw_batch_sizes, log=log)
            results["raw"] += raw.ceiling_rows(folder, payloads, processes=max(2, peer_workers), seconds=3 * profile.raw_seconds + 2, log=log,
                                               precision="int8")  # fmt: skip

    probe = raw.LoadProbe(folder, payloads[0])
    results["calibration_ms"] = {}

    def calibrate(name: str) -> None:
        """The raw engine's ms/image just before a server runs: how busy the machine was for that server."""
        if name in wanted:
            results["calibration_ms"][name] = probe.ms_per_image()

    calibrate("raw")
    stage("raw", do_raw)
    calibrate("detserve")
    lanes = max(1, peer_workers // DETSERVE_OPTIONS["num_replicas"])
    stage("detserve", lambda: run_detserve(folder, payloads, profile, results, lanes=lanes, direct=direct))
    if has_cpu_variant(folder):
        calibrate("detserve-int8")
        stage("detserve-int8", lambda: run_detserve(folder, payloads, profile, results, lanes=lanes, precision="auto", name="detserve-auto"))
    elif "detserve-int8" in wanted:
        results["errors"]["detserve-int8"] = f"{folder} has no gated int8 variant for CPUs: export it with --precision int8"
    if "detserve" not in wanted or not results["config"].get("open_loop_reference_images_per_s"):
        # Open-loop rates need a reference: without detserve's, use the raw single-image path.
        ref = raw.engine_rows(folder, payloads[:4], batch_sizes=[1], threads=[1], seconds=0.5, log=lambda _: None)[1]
        results["config"]["open_loop_reference_images_per_s"] = ref["images_per_s"]
    calibrate("litserve")
    stage("litserve", lambda: run_peer("litserve", folder, payloads, profile, results, outdir / "peers", peer_workers))
    calibrate("pytriton")
    stage("pytriton", lambda: run_peer("pytriton", folder, payloads, profile, results, outdir / "peers", peer_workers))
    results["calibration_ms"]["end"] = probe.ms_per_image()
    left = end_own_children()
    if left:
        results["errors"]["cleanup"] = f"child processes still running after the run were ended: {left}"
    results["machine"]["loadavg_end"] = _loadavg()
    results["total_seconds"] = round(time.monotonic() - began, 1)
    files = report.write_all(results, outdir)
    return results, files


def build_parser(prog: str = "python -m detserve.benchmarks") -> argparse.ArgumentParser:
    """The benchmark's options; ``detserve bench --help`` prints this parser's help."""
    parser = argparse.ArgumentParser(prog=prog, description="Raw engine, the baseline, detserve and peer servers, side by side, one at a time (benchmarks/README.md).")
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--quick", action="store_true", help="a few minutes: 2 closed-loop points + 1 open-loop point per server (default)")
    mode.add_argument("--full", action="store_true", help="concurrency 1..32, three open-loop rates, 5 s windows, 1 and 2 threads raw")
    mode.add_argument("--setup-peers", action="store_true", help="create PyTriton's own venv (needs the package registry), then exit")
    mode.add_argument("--adapter", metavar="DIR", help="a Dataloop adapter folder as written against its accelerated export, "
                      "one run, closed loop (--concurrency, default 8): benchmarks/adapter_speed.py")
    mode.add_argument("--overload", action="store_true",
                      help="detserve alone, as deploy.yaml ships it: peak, a burst, an open loop at 2x the peak, large and small requests mixed (benchmarks/overload.py)")  # fmt: skip
    parser.add_argument("--model", help="export folder (default: the default YOLO, or a random-init yolov8n if its weights are missing)")
    parser.add_argument("--adapter-model", metavar="NAME", help="with --adapter: the model of its dataloop.json (default: its only one)")
    parser.add_argument("--only", help="comma-separated subset of raw,detserve,detserve-int8,litserve,pytriton "
                        "(detserve includes detserve-int8: `precision: auto` beside fp32, when the model has a gated int8 variant)")
    parser.add_argument("--out", default=str(paths.results_dir()), help="results root (a timestamped folder is made inside)")
    parser.add_argument("--concurrency", help="override the closed-loop points, e.g. 1,4,16")
    parser.add_argument("--p99-budgets", help="p99 budgets in ms for the per-budget comparison, e.g. 250,500")
    parser.add_argument("--peer-workers", type=int, default=1, help="inference workers per peer; detserve's one replica gets as many engine lanes")
    parser.add_argument("--detserve-replicas", type=int, default=1,
                        help="detserve's replicas (processes); the --peer-workers lanes are shared among them (default 1)")  # fmt: skip
    parser.add_argument("--imgsz", type=int, help="export the default YOLO at this input size (e.g. 640) and serve that")
    parser.add_argument("--batch-policy", choices=("measured", "fixed"), help="detserve's user_config batch_policy (default: the shipped one, measured)")
    parser.add_argument("--direct-ingress", action="store_true", help="also measure HTTP straight to the replica (Ray's direct ingress, no proxy process)")
    parser.add_argument("--photos", action="store_true", help=f"payloads of mixed photo sizes {bench_payloads.PHOTO_SIZES} instead of 200-480 px scenes")
    overload = parser.add_argument_group("--overload")
    overload.add_argument("--overload-seconds", type=float, default=60.0, help="each open loop's length in seconds (default 60)")
    overload.add_argument("--overload-deadline", type=float, default=2.0,
                          help="the second open loop's x-request-timeout-seconds (default 2; 0: only the loop with the server's own deadline)")  # fmt: skip
    overload.add_argument("--overload-burst", type=int, default=300, help="requests sent at once in the burst (default 300)")
    overload.add_argument("--overload-large-side", type=int, default=3000, help="side in px of the large client's 64 JPEGs (default 3000)")
    return parser


def main(argv: list[str] | None = None, prog: str = "python -m detserve.benchmarks") -> int:
    args = build_parser(prog).parse_args(argv)
    if args.setup_peers:
        log(f"PyTriton venv ready: {peers.setup_pytriton()}")
        return 0
    stop_on_sigterm()
    if args.overload:
        from detserve.benchmarks import overload

        return overload.main(args)
    if args.adapter:
        from detserve.benchmarks import adapter_speed

        return adapter_speed.main(args.adapter, args.adapter_model, int(args.concurrency or 8), Path(args.out))
    profile = FULL if args.full else QUICK
    if args.concurrency:
        profile = replace(profile, concurrency=[int(x) for x in args.concurrency.split(",")])
    if args.detserve_replicas > 1:
        DETSERVE_OPTIONS["num_replicas"] = args.detserve_replicas
    if args.batch_policy:
        DETSERVE_OPTIONS["user_config"] = {**DETSERVE_OPTIONS["user_config"], "batch_policy": args.batch_policy}
    if args.p99_budgets:
        profile = replace(profile, p99_budgets_ms=[float(x) for x in args.p99_budgets.split(",")])
    only = [x.strip() for x in args.only.split(",")] if args.only else None
    results, files = run(profile, model=args.model, out_root=Path(args.out), only=only, peer_workers=args.peer_workers,
                         imgsz=args.imgsz, photos=args.photos, direct=args.direct_ingress)  # fmt: skip
    report.show(files["markdown"].read_text(), files.values())
    return 1 if results["errors"] else 0


if __name__ == "__main__":
    sys.exit(main())
