"""detserve as every benchmark serves it: deploy.yaml's settings, read in one place, and one way to start
it on an in-process Ray and to end what it leaves behind."""

from __future__ import annotations

import signal
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from detserve.benchmarks import loadgen
from detserve.benchmarks.ports import free_port
from detserve.runtime import paths

#: The route prefix of the application a benchmark deploys.
APP = "bench"


@dataclass
class Settings:
    """An application of the shipped config, pinned to one replica."""

    args: dict
    options: dict
    request_timeout_s: float
    logging_config: dict
    config_file: str = field(default_factory=lambda: str(paths.deploy_config()))

    def describe(self) -> str:
        o = self.options
        return (f"deploy.yaml's yolo application ({self.args.get('model')}), one replica (autoscaling off), "
                f"num_cpus {o.get('ray_actor_options', {}).get('num_cpus')}, max_ongoing_requests {o.get('max_ongoing_requests')}, "
                f"max_queued_requests {o.get('max_queued_requests')}, max_body_bytes {self.args.get('max_body_bytes')}, "
                f"max_images {self.args.get('max_images')}, request_timeout_s {self.request_timeout_s:g}; start_ray(2), proxy on 127.0.0.1")  # fmt: skip


def shipped_settings(config_path: Path | None = None, app: str = "yolo", model: str | None = None) -> Settings:
    """The application ``app`` of the shipped config (deploy.yaml), as ``detserve serve`` deploys it, with one fixed replica.

    One replica so that the capacity a run measures, and the RSS and fds the soak watches, are one process's
    for the whole run (an autoscaled second replica would start and stop with the load).
    """
    from detserve.serve.run import load_config

    config_path = Path(config_path or paths.deploy_config())
    config = load_config(config_path)
    [entry] = [a for a in config.applications if a.name == app]
    options: dict[str, Any] = {}
    for d in entry.deployments:
        options = d.model_dump(exclude_unset=True, exclude={"name"})
    options.update(num_replicas=1, autoscaling_config=None)
    args = dict(entry.args)
    if model:
        args["model"] = model
    logging_config = config.logging_config.model_dump(exclude_unset=True)
    return Settings(args, options, float(config.http_options.request_timeout_s), logging_config, str(config_path))


def start_detserve(args: dict[str, Any], options: dict[str, Any], *, request_timeout_s: float = 30.0, logging_config: dict | None = None,
                   body_limit: int | None = None, app: str = APP, wait_s: float = 120.0) -> tuple[str, dict]:  # fmt: skip
    """detserve on an in-process Ray; returns (base URL, logging_config) once ``/<app>/info`` answers.

    start_ray(2), Serve's proxy on 127.0.0.1 (a free port, HeadOnly, deploy.yaml's logging_config unless
    given), the application under ``/<app>``. ``body_limit``: the proxy's limit for the route, handed over
    as ``detserve serve`` does (before Ray starts; otherwise the default 50 MiB). The caller ends it with
    ``detserve.serve.run.shutdown()`` and then :func:`end_own_children`.
    """
    from ray import serve

    from detserve.serve.app import application
    from detserve.serve.run import set_proxy_body_limits, start_ray

    if body_limit is not None:
        set_proxy_body_limits({f"/{app}": body_limit})
    port = free_port()
    start_ray(2)
    if logging_config is None:
        logging_config = shipped_settings().logging_config
    serve.start(http_options={"host": "127.0.0.1", "port": port, "request_timeout_s": request_timeout_s}, proxy_location="HeadOnly",
                logging_config=logging_config)  # fmt: skip
    serve.run(application(args, options), name=app, route_prefix=f"/{app}", blocking=False, logging_config=logging_config)
    base = f"http://127.0.0.1:{port}"
    wait_http(f"{base}/{app}/info", wait_s)
    return base, logging_config


def wait_http(url: str, timeout_s: float) -> None:
    """Until ``url`` (on loopback) answers 200; raises the last error after ``timeout_s``."""
    import urllib.request

    loadgen.require_loopback(url)
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            with opener.open(url, timeout=5) as response:
                if response.status == 200:
                    return
        except Exception:
            if time.monotonic() > deadline:
                raise
        time.sleep(0.5)


def end_own_children(grace_s: float = 15.0) -> list[str]:
    """Wait for this process's children (Ray's, after shutdown) to exit; end any that do not, by pid. Returns what had to be ended."""
    import psutil

    me = psutil.Process()
    deadline = time.monotonic() + grace_s
    while (children := [c for c in me.children(recursive=True) if _alive(c)]) and time.monotonic() < deadline:
        time.sleep(0.5)
    ended = []
    for child in children:
        try:
            ended.append(f"{child.pid} {' '.join(child.cmdline())[:80]}")
            child.terminate()
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs(children, timeout=5)
    for child in children:
        if _alive(child):
            child.kill()
    return ended


def _alive(process) -> bool:
    import psutil

    try:
        return process.is_running() and process.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def stop_on_sigterm() -> None:
    """SIGTERM ends a run as Ctrl-C does: the finally blocks run (peers stopped, Ray shut down)."""

    def _raise(*_: object) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, _raise)
