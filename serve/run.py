"""``detserve serve``: deploy.yaml on an embedded local Ray, bound to 127.0.0.1, until Ctrl-C.

Ray's own ``serve run deploy.yaml`` works too; this runner adds what a laptop
needs: a private local Ray (never attaching to a stale cluster), the offline
environment in every worker, default models exported before the first
replica starts, a curl line that works as printed, and a clean shutdown.
"""

from __future__ import annotations

import logging
import os
import signal
import sys
import time
from pathlib import Path
from typing import Any

from detserve.runtime import offline

ROOT = Path(__file__).resolve().parent.parent


def load_config(path: Path):
    import yaml
    from ray.serve.schema import ServeDeploySchema

    return ServeDeploySchema.model_validate(yaml.safe_load(Path(path).read_text()))


def placement_problems(config, cpus: float) -> list[str]:
    """What in ``config`` Ray could never place on ``cpus`` CPUs: every app at its max_replicas must fit together.

    Autoscaling asks for replicas up to ``max_replicas``; one that cannot be
    placed waits forever (and the load it was meant for waits with it), so
    this is a configuration error, reported before anything starts.
    """
    problems, total = [], 0.0
    for app in config.applications:
        for d in app.deployments:
            options = d.model_dump(exclude_unset=True)
            actor = options.get("ray_actor_options") or {}
            per_replica = float(actor.get("num_cpus", 1.0))
            auto = options.get("autoscaling_config") or {}
            replicas = int(auto.get("max_replicas", options.get("num_replicas", 1) or 1))
            if per_replica > cpus:
                problems.append(f"{app.name}: one replica asks for {per_replica:g} CPUs; this Ray has {cpus:g}")
            total += per_replica * replicas
    if total > cpus + 1e-9:
        problems.append(
            f"at max_replicas the applications ask for {total:g} CPUs and this Ray has {cpus:g}: "
            "lower max_replicas or ray_actor_options.num_cpus in the config (fractions are fine)"
        )
    return problems


def start_ray(num_cpus: int | None = None, metrics_port: int | None = None) -> None:
    """A private, loopback-only Ray for this process.

    Ray's Prometheus endpoint (Serve's and detserve's metrics) listens on
    ``http://127.0.0.1:<metrics_port>/metrics``: ``DETSERVE_METRICS_PORT``, 8080 by default.
    """
    import ray

    env = offline.apply()
    temp = Path(os.environ.get("DETSERVE_RAY_TMP", f"/tmp/detserve-ray-{os.getuid()}"))
    temp.mkdir(parents=True, exist_ok=True)
    ray.init(
        address="local",
        num_cpus=num_cpus or os.cpu_count(),
        include_dashboard=False,
        object_store_memory=200 * 1024 * 1024,
        _node_ip_address="127.0.0.1",
        _temp_dir=str(temp),
        runtime_env={"env_vars": {**env, "DETSERVE_ROOT": str(ROOT)}},
        logging_level="WARNING",
        configure_logging=True,
        _metrics_export_port=metrics_port or int(os.environ.get("DETSERVE_METRICS_PORT", "8080")),
    )


def log_level() -> str:
    """Ray's and Serve's log level under ``detserve serve``: WARNING unless ``DETSERVE_LOG_LEVEL`` asks (INFO, DEBUG)."""
    return os.environ.get("DETSERVE_LOG_LEVEL", "WARNING").upper()


class _OwnServeNotice(logging.Filter):
    """Drops Serve's "Connecting to existing Serve app... New http_options will not be applied".

    ``serve.start`` sets the HTTP options, then ``serve.run_many`` connects to that same
    Serve and logs the notice, which reads as if the options were lost. They were not.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        return "New http_options" not in record.getMessage()


def deploy(config_path: Path, host: str = "127.0.0.1", port: int = 8000, only: list[str] | None = None) -> list[str]:
    """Start Serve and every application of the config (or ``only`` those); returns their route prefixes."""
    from ray import serve
    from ray.serve.schema import LoggingConfig

    from detserve.serve.app import application

    import ray

    config = load_config(config_path)
    chosen = config.model_copy(update={"applications": [a for a in config.applications if not only or a.name in only]})
    problems = placement_problems(chosen, float(ray.cluster_resources().get("CPU", 0)))
    if problems:
        raise ValueError("the Serve config cannot be placed: " + "; ".join(problems))
    http = config.http_options
    logging_config = LoggingConfig(**{**config.logging_config.model_dump(), "log_level": log_level()})
    serve_logger = logging.getLogger("ray.serve")
    serve_logger.setLevel(log_level())
    serve_logger.addFilter(_OwnServeNotice())
    serve.start(
        http_options={"host": host, "port": port, "request_timeout_s": http.request_timeout_s},
        proxy_location="HeadOnly",
        logging_config=logging_config,
    )
    targets = []
    for app in config.applications:
        if only and app.name not in only:
            continue
        if app.import_path != "detserve.serve.app:build_app":
            raise ValueError(f"application {app.name}: detserve serve runs detserve.serve.app:build_app apps; use `serve run` for {app.import_path}")
        options: dict[str, Any] = {}
        for d in app.deployments:
            options = d.model_dump(exclude_unset=True, exclude={"name"})
        targets.append(serve.RunTarget(application(app.args, options), name=app.name, route_prefix=app.route_prefix, logging_config=logging_config))
    if not targets:
        raise ValueError(f"no application of {config_path} matches --app {' '.join(only or [])}: choose from {', '.join(a.name for a in config.applications)}")
    serve.run_many(targets)  # one call: the apps start side by side, Serve is connected to once
    return [t.route_prefix for t in targets]


def banner(routes: list[str], host: str, port: int, metrics_port: int, sample: Path) -> list[str]:
    """The lines printed once the server is ready: URLs, a curl per app that works as printed, docs, metrics."""
    import shlex

    reach = "127.0.0.1" if host in ("0.0.0.0", "::", "") else host  # a wildcard bind is reached on loopback
    base = f"http://{reach}:{port}"
    lines = [f"detserve is serving {', '.join(routes)} on {base}", "", "Try:"]
    for route in routes:
        lines.append(f"  curl -s -X POST '{base}{route}/predict?conf=0.25' -H 'Content-Type: image/jpeg' --data-binary @{shlex.quote(str(sample))}")
    lines += [""]
    for route in routes:
        lines.append(f"  API docs   {base}{route}/docs      model and classes: {base}{route}/info")
    lines += [
        f"  metrics    http://127.0.0.1:{metrics_port}/metrics  (detserve_*, ray_serve_*)",
        f"  status     detserve status --url {base}",
        "",
        "Ctrl-C stops the server and Ray. More logs: DETSERVE_LOG_LEVEL=INFO.",
    ]
    return lines


def shutdown() -> None:
    import ray
    from ray import serve

    try:
        serve.shutdown()
    finally:
        ray.shutdown()


def main(config_path: Path = ROOT / "deploy.yaml", host: str = "127.0.0.1", port: int = 8000, only: list[str] | None = None) -> None:
    from detserve.runtime.defaults import sample_path
    from detserve.runtime.progress import console, step

    with step("Starting Ray on 127.0.0.1"):
        start_ray()
    # Ctrl-C and SIGTERM both stop Serve and Ray. SIGINT explicitly: a
    # process started in the background by a shell inherits it ignored.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, lambda *_: (_ for _ in ()).throw(KeyboardInterrupt()))
    try:
        with step("Starting Serve and the applications (a replica loads its model)"):
            routes = deploy(config_path, host, port, only)
    except BaseException:
        shutdown()
        raise
    metrics_port = int(os.environ.get("DETSERVE_METRICS_PORT", "8080"))
    console.rule("[bold green]ready[/]")
    for line in banner(routes, host, port, metrics_port, sample_path()):
        console.print(line, markup=False, highlight=False)
    console.rule()
    try:
        while True:
            time.sleep(1)
    except KeyboardInterrupt:
        console.print("stopping...")
    finally:
        shutdown()
        console.print("stopped.")


if __name__ == "__main__":
    main(only=sys.argv[1:] or None)
