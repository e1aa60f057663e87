"""Cluster checks run in their own process (tests/test_cluster.py): autoscaling, and a 3-node Ray.

Each check starts its own Ray, so it cannot share (or break) the session Ray of
tests/test_serve.py. Run one by hand with:

    export DETSERVE_RAY_TMP=/tmp/ray-$USER-check   # short: Ray's socket paths must stay under 107 bytes
    scripts/offline-run .venv/bin/python -m tests.cluster_checks autoscale <yolo export folder>
    scripts/offline-run .venv/bin/python -m tests.cluster_checks multinode <yolo export folder>

The last line printed is a JSON report; the test asserts on it. All traffic is
127.0.0.1; every load loop is bounded in requests and in time.
"""

from __future__ import annotations

import asyncio
import collections
import io
import json
import os
import sys
import time

from detserve.benchmarks.ports import free_port
from detserve.runtime import paths

# Fast autoscaling metrics, as Ray's own autoscaling tests use. Read by every Ray
# process at start, so set before Ray starts (the raylets pass them to workers).
FAST_METRICS_ENV = {
    "RAY_SERVE_HANDLE_AUTOSCALING_METRIC_PUSH_INTERVAL_S": "0.1",
    "RAY_SERVE_REPLICA_AUTOSCALING_METRIC_PUSH_INTERVAL_S": "0.1",
}
QUIET = {"enable_access_log": False, "log_level": "WARNING"}
APP, DEPLOYMENT = "yolo", "DetectionServer"


def sample_png() -> bytes:
    from PIL import Image

    from detserve.training.synthetic import scenes

    buf = io.BytesIO()
    Image.fromarray(scenes(1, seed=4321)[0].image).save(buf, format="PNG")
    return buf.getvalue()


def replica_states() -> dict[str, int]:
    from ray import serve

    app = serve.status().applications.get(APP)
    if app is None or DEPLOYMENT not in app.deployments:
        return {}
    return {str(getattr(k, "value", k)): v for k, v in app.deployments[DEPLOYMENT].replica_states.items()}


def running_replicas() -> int:
    return replica_states().get("RUNNING", 0)


def replica_nodes() -> dict[str, str]:
    """Live replica actor id -> the node id it runs on, from the GCS (no dashboard needed)."""
    import ray._private.state

    return {
        actor_id: info["Address"]["NodeID"]
        for actor_id, info in ray._private.state.actors().items()
        if info["ActorClassName"].startswith(f"ServeReplica:{APP}:") and info["State"] == "ALIVE"
    }


def wait_for(predicate, timeout_s: float, poll_s: float = 0.2) -> float | None:
    """Seconds until ``predicate()`` held, or None after ``timeout_s``."""
    start = time.monotonic()
    while time.monotonic() - start < timeout_s:
        if predicate():
            return time.monotonic() - start
        time.sleep(poll_s)
    return None


class Outcomes:
    """What every attempt and every logical request got, by kind."""

    def __init__(self) -> None:
        self.attempts: collections.Counter[str] = collections.Counter()
        self.final: collections.Counter[str] = collections.Counter()
        self.samples: dict[str, str] = {}

    def attempt(self, kind: str, sample: str = "") -> None:
        self.attempts[kind] += 1
        self.samples.setdefault(kind, sample[:300])


async def post_once(session, url: str, body: bytes, out: Outcomes) -> tuple[str, float]:
    """One attempt: its kind (200, 503-json, 500-text, transport:...) and the Retry-After it gave."""
    import aiohttp

    try:
        async with session.post(url, data=body, headers={"content-type": "image/png"}) as r:
            text = await r.text()
            if r.status == 200:
                kind = "200"
            else:
                try:
                    json.loads(text)["error"]["code"]
                    kind = f"{r.status}-json"
                except Exception:
                    kind = f"{r.status}-text"
            out.attempt(kind, text if kind != "200" else "")
            return kind, float(r.headers.get("Retry-After", 0) or 0)
    except (aiohttp.ClientError, asyncio.TimeoutError) as exc:
        kind = f"transport:{type(exc).__name__}"
        out.attempt(kind, str(exc))
        return kind, 0.0


async def closed_loop(url: str, body: bytes, workers: int, stop: asyncio.Event, out: Outcomes, retries: int = 0, max_requests: int = 5000):
    """``workers`` clients, each sending its next request when the last is answered, until ``stop``.

    With ``retries``, a logical request is retried (the predict call is
    idempotent) on anything but 200 or a JSON 503, after its Retry-After or a
    short backoff; its final kind is what the last attempt got.
    """
    import aiohttp

    timeout = aiohttp.ClientTimeout(total=60)
    sent = 0
    async with aiohttp.ClientSession(timeout=timeout, connector=aiohttp.TCPConnector(limit=workers)) as session:

        async def worker():
            nonlocal sent
            while not stop.is_set() and sent < max_requests:
                sent += 1
                for attempt in range(retries + 1):
                    kind, retry_after = await post_once(session, url, body, out)
                    if kind in ("200", "503-json") or attempt == retries:
                        break
                    await asyncio.sleep(min(2.0, max(retry_after, 0.2 * (attempt + 1))))
                out.final[kind] += 1

        await asyncio.gather(*(worker() for _ in range(workers)))


# ---- 1. autoscaling ----------------------------------------------------------
def autoscale(export: str, max_replicas: int = 2, heavy_workers: int = 8, up_timeout_s: float = 60, down_timeout_s: float = 60) -> dict:
    """1 replica -> max_replicas under closed-loop load -> back to 1 under a trickle; every request must be 200."""
    os.environ.update(FAST_METRICS_ENV)
    from ray import serve

    from detserve.serve.app import application
    from detserve.serve.run import shutdown, start_ray

    # Logical CPUs are accounting only: 4 of them let Ray place max_replicas
    # replicas of num_cpus=1 on this 2-core machine.
    start_ray(num_cpus=4, metrics_port=free_port())
    try:
        port = free_port()
        serve.start(http_options={"host": "127.0.0.1", "port": port, "request_timeout_s": 30}, logging_config=QUIET)
        options = {
            "max_ongoing_requests": 64,
            "ray_actor_options": {"num_cpus": 1},
            "graceful_shutdown_timeout_s": 30,
            "graceful_shutdown_wait_loop_s": 0.2,
            "autoscaling_config": {
                "min_replicas": 1, "initial_replicas": 1, "max_replicas": max_replicas,
                "target_ongoing_requests": 2,
                "metrics_interval_s": 0.1, "look_back_period_s": 0.5,
                "upscale_delay_s": 0, "downscale_delay_s": 1,
            },
            "user_config": {"max_batch_size": 4},
        }  # fmt: skip
        serve.run(application({"model": export}, options), name=APP, route_prefix=f"/{APP}", blocking=False, logging_config=QUIET)
        url = f"http://127.0.0.1:{port}/{APP}/predict"
        assert wait_for(lambda: running_replicas() == 1, 120), f"the first replica never started: {replica_states()}"
        body = sample_png()
        report: dict = {"max_replicas": max_replicas}

        async def run() -> None:
            heavy, light = Outcomes(), Outcomes()
            stop_heavy, stop_light = asyncio.Event(), asyncio.Event()
            counts: list[tuple[float, int]] = []

            async def watch():
                start = time.monotonic()
                while not stop_light.is_set():
                    counts.append((round(time.monotonic() - start, 2), await asyncio.to_thread(running_replicas)))
                    await asyncio.sleep(0.2)

            watcher = asyncio.create_task(watch())
            light_task = asyncio.create_task(closed_loop(url, body, 1, stop_light, light))
            heavy_task = asyncio.create_task(closed_loop(url, body, heavy_workers, stop_heavy, heavy))
            t0 = time.monotonic()
            up = None
            while time.monotonic() - t0 < up_timeout_s:
                if counts and counts[-1][1] >= max_replicas:
                    up = time.monotonic() - t0
                    break
                await asyncio.sleep(0.1)
            if up is not None:
                await asyncio.sleep(3)  # load on every replica before the scale-down
            stop_heavy.set()
            await heavy_task
            # A trickle (one closed-loop client) keeps requests in flight while a replica drains.
            t1 = time.monotonic()
            down = None
            while up is not None and time.monotonic() - t1 < down_timeout_s:
                if counts and counts[-1][1] == 1 and replica_states().keys() <= {"RUNNING"}:
                    down = time.monotonic() - t1
                    break
                await asyncio.sleep(0.1)
            await asyncio.sleep(2)
            stop_light.set()
            await light_task
            await watcher
            report.update(
                scale_up_s=None if up is None else round(up, 2),
                scale_down_s=None if down is None else round(down, 2),
                peak_replicas=max(c for _, c in counts),
                heavy_attempts=dict(heavy.attempts), light_attempts=dict(light.attempts),
                samples={**heavy.samples, **light.samples},
                timeline=counts[:: max(1, len(counts) // 40)],
            )  # fmt: skip

        asyncio.run(run())
        report["final_replica_states"] = replica_states()
        return report
    finally:
        shutdown()


# ---- 2. a three-node Ray cluster ------------------------------------------------
def multinode(export: str, before_s: float = 4, after_s: float = 10, workers: int = 6, retries: int = 8) -> dict:
    """Head (no CPUs) + two 1-CPU workers; one replica per worker; kill a worker under load."""
    from detserve.runtime import offline
    from detserve.serve import ray_auth

    from detserve.serve import ingress

    env = offline.apply()  # before `import ray`: Ray reads the loopback switch at import
    env.update(ingress.apply())  # the same ingress as `detserve serve`: every node inherits it
    import ray
    from ray.cluster_utils import Cluster

    temp = ray_auth.run_dir() / "cluster"
    # Cluster writes <RAY_TMPDIR>/ray/ray_current_cluster (the machine-wide /tmp/ray without it):
    # keep that in this run's own folder too.
    (temp / "ray").mkdir(parents=True, exist_ok=True)
    os.environ["RAY_TMPDIR"] = str(temp)
    # Token auth on, as on a real cluster: every node (each a child of this process) reads
    # the same token file, and so does the driver.
    auth = ray_auth.environment(temp)
    os.environ.pop("RAY_AUTH_TOKEN", None)
    os.environ.update(auth)
    node = {"object_store_memory": 100 * 1024 * 1024, "node_ip_address": "127.0.0.1"}
    # The GCS declares a silent node dead after period x threshold (default 3 s x 5);
    # shorter here so the test sees the loss, and the replacement, in seconds.
    system_config = {"health_check_initial_delay_ms": 0, "health_check_period_ms": 500, "health_check_failure_threshold": 3}
    cluster = Cluster(
        initialize_head=True,
        head_node_args={
            **node, "num_cpus": 0, "resources": {"head": 1}, "include_dashboard": False,
            "temp_dir": str(temp), "metrics_export_port": free_port(), "_system_config": system_config,
        },
    )  # fmt: skip
    report: dict = {}
    try:
        w1 = cluster.add_node(**node, num_cpus=1, resources={"w1": 1}, metrics_export_port=free_port())
        cluster.add_node(**node, num_cpus=1, resources={"w2": 1}, metrics_export_port=free_port())
        cluster.wait_for_nodes()
        from ray import serve

        from detserve.serve.app import application

        ray.init(
            address=cluster.address, logging_level="WARNING",
            runtime_env={"env_vars": {**env, **auth, paths.ROOT_ENV: str(paths.root())}},
        )  # fmt: skip
        port = free_port()
        serve.start(http_options={"host": "127.0.0.1", "port": port, "request_timeout_s": 30}, proxy_location="HeadOnly", logging_config=QUIET)
        # num_cpus=1 on 1-CPU workers and a head with none: one replica per worker node.
        options = {
            "max_ongoing_requests": 64,
            "ray_actor_options": {"num_cpus": 1},
            "graceful_shutdown_timeout_s": 5,
            "health_check_period_s": 1,
            "health_check_timeout_s": 10,
            "autoscaling_config": {"min_replicas": 2, "initial_replicas": 2, "max_replicas": 2},
            "user_config": {"max_batch_size": 4},
        }
        serve.run(application({"model": export}, options), name=APP, route_prefix=f"/{APP}", blocking=False, logging_config=QUIET)
        assert wait_for(lambda: running_replicas() == 2, 180), f"two replicas never started: {replica_states()}"
        nodes = replica_nodes()
        names = {n["NodeID"]: n["Resources"] for n in ray.nodes()}
        report["replica_nodes"] = sorted(next(k for k in names[v] if k in ("w1", "w2", "head")) for v in nodes.values())
        url = f"http://127.0.0.1:{port}/{APP}/predict"
        body = sample_png()

        async def run() -> None:
            out, stop = Outcomes(), asyncio.Event()
            load = asyncio.create_task(closed_loop(url, body, workers, stop, out, retries=retries))
            await asyncio.sleep(before_s)
            before = sum(out.final.values())
            killed_at = time.monotonic()
            await asyncio.to_thread(cluster.remove_node, w1, False)  # SIGKILL: no drain
            report["kill_took_s"] = round(time.monotonic() - killed_at, 2)
            await asyncio.sleep(after_s)
            stop.set()
            await load
            report.update(
                requests_before_kill=before, requests=sum(out.final.values()),
                final=dict(out.final), attempts=dict(out.attempts), samples=out.samples,
            )  # fmt: skip

        asyncio.run(run())
        report["replica_states_after_kill"] = replica_states()
        # The lost replica cannot be placed (no CPU left); a new node takes it.
        cluster.add_node(**node, num_cpus=1, resources={"w3": 1}, metrics_export_port=free_port())
        replaced = wait_for(lambda: running_replicas() == 2, 120)
        report["replacement_s"] = None if replaced is None else round(replaced, 2)
        names = {n["NodeID"]: n["Resources"] for n in ray.nodes() if n["Alive"]}
        report["replica_nodes_after"] = sorted(next((k for k in names.get(v, {}) if k in ("w1", "w2", "w3")), "?") for v in replica_nodes().values())

        async def after() -> None:
            out = Outcomes()
            stop = asyncio.Event()
            stop.set()  # not used: one bounded burst below
            import aiohttp

            async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=60)) as session:
                kinds = await asyncio.gather(*(post_once(session, url, body, out) for _ in range(8)))
            report["after_recovery"] = dict(collections.Counter(k for k, _ in kinds))

        asyncio.run(after())
        return report
    finally:
        try:
            from ray import serve

            serve.shutdown()
        except Exception:
            pass
        ray.shutdown()
        cluster.shutdown()


if __name__ == "__main__":
    check, export = sys.argv[1], sys.argv[2]
    result = {"autoscale": autoscale, "multinode": multinode}[check](export)
    print("REPORT " + json.dumps(result))
