"""``detserve serve``: deploy.yaml on an embedded local Ray, bound to 127.0.0.1, until Ctrl-C.

Ray's own ``serve run deploy.yaml`` works too; this runner adds what a laptop
needs: a private local Ray (never attaching to a stale cluster), the offline
environment in every worker, default models exported before the first
replica starts, a curl line that works as printed, and a clean shutdown.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from detserve.runtime import offline, paths
from detserve.serve import ray_auth
from detserve.serve import ingress


def load_config(path: Path):
    offline.apply()  # before `import ray`: Ray reads the loopback switch at import
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


def proxy_body_limits(config) -> dict[str, int]:
    """{route prefix: max_body_bytes} of every application of ``config``: the limits the ingress enforces (serve/body_limit.py)."""
    from detserve.serve.app import app_args

    return {app.route_prefix: app_args(app.args or {}).max_body_bytes for app in config.applications if app.route_prefix}


def route_timeouts(config) -> dict[str, float]:
    """{route prefix: request_timeout_s} of every application of ``config``: the longest deadline each accepts
    (serve/client_deadline.py)."""
    from detserve.serve.app import app_args

    return {app.route_prefix: app_args(app.args or {}).request_timeout_s for app in config.applications if app.route_prefix}


def set_proxy_body_limits(limits: dict[str, int]) -> None:
    """Hand the ingress its body limits; call before :func:`start_ray` (it reads them from Ray's environment).

    A ``DETSERVE_PROXY_BODY_LIMITS`` already set by the user wins.
    """
    from detserve.serve.route_limits import LIMITS_ENV

    os.environ.setdefault(LIMITS_ENV, json.dumps(limits, sort_keys=True))


def set_route_timeouts(timeouts: dict[str, float]) -> None:
    """Hand the ingress each route's request timeout; call before :func:`start_ray`. A ``DETSERVE_ROUTE_TIMEOUTS``
    already set by the user wins."""
    from detserve.serve.route_limits import TIMEOUTS_ENV

    os.environ.setdefault(TIMEOUTS_ENV, json.dumps(timeouts, sort_keys=True))


#: One node: HAProxy runs beside the replicas and takes a stopping replica out of its config at once, so the
#: replica need not stay reachable for Ray's deregistration window of 30 s, which held an idle Ctrl-C for 33 s.
#: A stopping replica still finishes what it admitted (graceful_shutdown_timeout_s, 30 s in deploy.yaml): the
#: drain is bounded by the work admitted, not by a fixed wait. Not for `ray start` clusters, whose other nodes'
#: HAProxy needs the window (serve/ingress.py's exports leave Ray's default).
SINGLE_NODE_ENV = {"RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S": "0"}


def start_ray(num_cpus: int | None = None, metrics_port: int | None = None) -> None:
    """A private, loopback-only Ray for this process, with token authentication on.

    Every listener of the process tree (GCS, raylet, object manager, workers, agents,
    metrics, HAProxy, each replica's HTTP and gRPC servers) is on 127.0.0.1
    (:func:`exposed_listeners` names any that is not).
    The token is ``<run dir>/auth/token`` (0600); :func:`attach` finds it there.
    Ray's Prometheus endpoint (Serve's and detserve's metrics) listens on
    ``http://127.0.0.1:<metrics_port>/metrics``: ``DETSERVE_METRICS_PORT``, 8080 by default.
    """
    env = offline.apply()  # before `import ray`: Ray reads the loopback switch at import
    env.update(ingress.apply())  # Serve reads its ingress switches at import, in every Ray process: before Ray starts
    env.update({key: os.environ.setdefault(key, value) for key, value in SINGLE_NODE_ENV.items()})
    import ray

    _require_loopback_ray()
    temp = ray_auth.run_dir()
    temp.mkdir(parents=True, exist_ok=True)
    auth = ray_auth.environment(temp)
    # RAY_AUTH_TOKEN would win over the file in every Ray process.
    os.environ.pop("RAY_AUTH_TOKEN", None)
    os.environ.update(auth)
    ray.init(
        address="local",
        num_cpus=num_cpus or os.cpu_count(),
        include_dashboard=False,
        object_store_memory=200 * 1024 * 1024,
        _node_ip_address="127.0.0.1",
        _temp_dir=str(temp),
        runtime_env={"env_vars": {**env, **auth, paths.ROOT_ENV: str(paths.root())}},
        logging_level="WARNING",
        configure_logging=True,
        _metrics_export_port=metrics_port or int(os.environ.get("DETSERVE_METRICS_PORT", "8080")),
    )
    from detserve.serve.worker_logs import drop_known_noise

    drop_known_noise()
    node_ip = ray.util.get_node_ip_address()
    if node_ip != "127.0.0.1":
        ray.shutdown()
        raise RuntimeError(f"Ray bound to {node_ip}, not 127.0.0.1; stopped it. Set RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 before importing ray.")
    _address_file(temp).write_text(ray.get_runtime_context().gcs_address + "\n")


def _address_file(run_dir: Path) -> Path:
    return ray_auth.auth_dir(run_dir) / "address"


def _require_loopback_ray() -> None:
    # RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER is read once, when ray is imported.
    from ray._private import ray_constants

    if ray_constants.ENABLE_RAY_CLUSTER:
        raise RuntimeError(
            "ray was imported before detserve.runtime.offline.apply() (or with RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER set), "
            "so Ray would listen on this machine's network address. Call offline.apply() first, "
            "or set RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 in the environment."
        )


def attach(run_dir: Path | None = None) -> str:
    """Connect this Python process to the Ray of a running ``detserve serve`` (same user); returns its address.

    Then the handle API works: ``serve.get_app_handle("yolo").predict.remote(image_bytes).result()``.
    Call it before importing ray. It reads the cluster address and the token from
    ``<run dir>/auth/`` (``DETSERVE_RAY_TMP`` or /tmp/detserve-ray-<uid>, as the server used).
    HTTP clients (``detserve.serve.client``) need neither.
    """
    offline.apply()  # before `import ray`: Ray reads the loopback switch at import
    import ray

    _require_loopback_ray()
    run_dir = run_dir or ray_auth.run_dir()
    address_file = _address_file(run_dir)
    if not address_file.exists():
        raise FileNotFoundError(f"no running detserve serve found ({address_file} is missing); start one, or pass its run directory (DETSERVE_RAY_TMP)")
    token = ray_auth.auth_dir(run_dir) / "token"
    os.environ.pop("RAY_AUTH_TOKEN", None)
    os.environ.update({"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": str(token)} if token.exists() else {"RAY_AUTH_MODE": "disabled"})
    address = address_file.read_text().strip()
    ray.init(address=address, logging_level="WARNING")
    return address


def require_auth_for(host: str) -> None:
    """Refuse a non-loopback HTTP host while Ray token authentication is off."""
    if not _is_loopback(host) and not ray_auth.enabled():
        raise ValueError(f"--host {host} reaches beyond this machine and needs Ray token auth: unset RAY_AUTH_MODE=disabled, or use --host 127.0.0.1")


def _is_loopback(host: str) -> bool:
    import ipaddress

    if host == "localhost":
        return True
    try:
        address = ipaddress.ip_address(host.strip("[]"))
    except ValueError:
        return False  # a host name: assume it reaches beyond loopback
    mapped = getattr(address, "ipv4_mapped", None)
    return (mapped or address).is_loopback


@dataclass(frozen=True)
class Listener:
    """One socket of the process tree that takes connections or datagrams: a listening TCP socket, a bound UDP one."""

    host: str
    port: int
    pid: int
    process: str
    kind: str = "tcp"  # or "udp"

    @property
    def address(self) -> str:
        address = f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"
        return address if self.kind == "tcp" else f"{address}/udp"


def listeners() -> list[Listener]:
    """Every listening TCP socket and bound UDP socket of this process and its descendants (Ray's processes are all
    descendants; HAProxy too)."""
    import socket

    import psutil

    me = psutil.Process()
    found = []
    for proc in [me, *me.children(recursive=True)]:
        try:
            name = proc.cmdline()[0] if proc.cmdline() else proc.name()
            conns = proc.net_connections(kind="inet")
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
        for c in conns:
            if c.type == socket.SOCK_STREAM and c.status == psutil.CONN_LISTEN:
                found.append(Listener(c.laddr.ip, c.laddr.port, proc.pid, name))
            elif c.type == socket.SOCK_DGRAM and c.laddr:
                found.append(Listener(c.laddr.ip, c.laddr.port, proc.pid, name, "udp"))
    return found


def exposed_listeners() -> list[Listener]:
    """The listeners beyond loopback: none with ``detserve serve`` on its defaults (docs/security.md).

    Two used to be: each Serve replica's gRPC server, which Ray 2.60 binds to ``[::]:0``
    (serve/replica_grpc.py binds it to the node's address instead), and HAProxy's UDP
    socket for its syslog target (serve/ingress.py drops the target). Anything listed
    here is named in the start banner with what guards it.
    """
    return [one for one in listeners() if not _is_loopback(one.host)]


def exposure_line() -> str:
    """One line for the start banner: every socket on loopback, or what is not and what guards it."""
    exposed = exposed_listeners()
    if not exposed:
        return "Every socket of the server is on 127.0.0.1 (docs/security.md)."
    ports = ", ".join(f"{one.address} ({Path(one.process).name})" for one in exposed)
    if ray_auth.enabled():
        return f"Not on loopback: {ports}. Ray's RPC ports require the Ray token (docs/security.md says why each is there)."
    return f"WARNING: Ray token auth is off (RAY_AUTH_MODE=disabled) and {ports} listen beyond loopback: anyone who reaches them can call them."


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


#: The Serve config builders ``detserve serve --config`` runs: exported models, and Dataloop adapter folders.
IMPORT_PATHS = ("detserve.serve.app:build_app", "detserve.serve.app:build_adapter_app")


def deploy(config_path: Path, host: str = "127.0.0.1", port: int = 8000, only: list[str] | None = None) -> list[str]:
    """Start Serve and every application of the config (or ``only`` those); returns their route prefixes."""
    from ray import serve
    from ray.serve.schema import LoggingConfig

    from detserve.serve.app import application

    import ray

    require_auth_for(host)
    config = load_config(config_path)
    chosen = config.model_copy(update={"applications": [a for a in config.applications if not only or a.name in only]})
    problems = placement_problems(chosen, float(ray.cluster_resources().get("CPU", 0)))
    if problems:
        raise ValueError("the Serve config cannot be placed: " + "; ".join(problems))
    logging_config = LoggingConfig(**{**(config.logging_config.model_dump() if config.logging_config else {}), "log_level": log_level()})
    start_serve(host, port, config.http_options.request_timeout_s, logging_config)
    targets = []
    for app in config.applications:
        if only and app.name not in only:
            continue
        if app.import_path not in IMPORT_PATHS:
            raise ValueError(f"application {app.name}: detserve serve runs {' and '.join(IMPORT_PATHS)} apps; use `serve run` for {app.import_path}")
        options: dict[str, Any] = {}
        for d in app.deployments:
            options = d.model_dump(exclude_unset=True, exclude={"name"})
        targets.append(serve.RunTarget(application(app.args, options), name=app.name, route_prefix=app.route_prefix, logging_config=logging_config))
    if not targets:
        raise ValueError(f"no application of {config_path} matches --app {' '.join(only or [])}: choose from {', '.join(a.name for a in config.applications)}")
    return run_targets(targets)


@dataclass(frozen=True)
class AdapterServing:
    """``detserve serve --adapter DIR [--model NAME ...] [--accelerated]``: one application per model, at /<model name>."""

    folder: Path
    models: tuple[str, ...] = ()  # empty: every model of the folder's dataloop.json
    accelerated: bool = False
    request_timeout_s: float = 30.0


def adapter_apps(serving: AdapterServing, cluster=None) -> list[tuple[str, dict[str, Any], Any]]:
    """(model name, args, ReplicaPlan) of each application; the cluster is shared equally among them.

    Reads only dataloop.json (no adapter code runs here): a folder or model name that is wrong stops here, before Ray.
    """
    from detserve.adapters.dataloop_app import accelerated_problem, export_folder, read_app, replica_plan
    from detserve.serve.app import AdapterArgs, free_cluster

    app = read_app(serving.folder)
    names = list(serving.models) or list(app.models)
    apps = []
    for name in names:
        model = app.model(name)
        problem = accelerated_problem(export_folder(app, model)) if serving.accelerated else None
        if problem:
            raise ValueError(f"{name}: {problem}")
        args = AdapterArgs(adapter=str(app.folder), model=name, accelerated=serving.accelerated, request_timeout_s=serving.request_timeout_s)
        apps.append((name, args.model_dump(exclude_defaults=True), replica_plan(model, cluster or free_cluster(), len(names))))
    return apps


def check_adapter(serving: AdapterServing) -> None:
    """Import and load the folder's adapters in a child process, as each replica will, before Ray starts.

    A replica that fails to start is retried by Serve (three times, some 50 s here) and reported as a Ray
    traceback; this says the same in one line (:class:`DeployFailed`), at once. A child process, so that the
    adapter's imports, model and memory do not stay in the process that runs Ray. An accelerated app runs no
    adapter code: nothing to check.
    """
    import subprocess

    if serving.accelerated:
        return
    done = subprocess.run([sys.executable, "-m", "detserve.adapters.user_adapter", str(serving.folder), *serving.models],
                          capture_output=True, text=True)  # fmt: skip
    if done.returncode == 3:
        raise DeployFailed(done.stdout.strip().splitlines()[-1])
    if done.returncode != 0:
        tail = (done.stderr.strip().splitlines() or ["(no output)"])[-1]
        raise DeployFailed(f"checking the adapter in {serving.folder} failed: {tail}")


def config_adapters(config, only: list[str] | None = None) -> list[AdapterServing]:
    """The adapter applications of a Serve config (``build_adapter_app``), as ``detserve serve --adapter`` would name them."""
    from detserve.serve.app import AdapterArgs, resolve_path

    out = []
    for app in config.applications:
        if app.import_path == IMPORT_PATHS[1] and (not only or app.name in only):
            args = AdapterArgs(**(app.args or {}))
            out.append(AdapterServing(resolve_path(args.adapter), (args.model,) if args.model else (), args.accelerated, args.request_timeout_s))
    return out


def deploy_adapter(serving: AdapterServing, host: str = "127.0.0.1", port: int = 8000) -> list[str]:
    """Start Serve and one application per model of an adapter folder; returns their route prefixes.

    Resources and autoscaling come from each model's compute config, capped to this Ray (one line each says so).
    """
    from ray import serve
    from ray.serve.schema import LoggingConfig

    from detserve.serve.app import DetectionServer

    require_auth_for(host)
    apps = adapter_apps(serving)
    logging_config = LoggingConfig(encoding="TEXT", log_level=log_level(), enable_access_log=False)
    start_serve(host, port, serving.request_timeout_s, logging_config)
    targets = []
    for name, args, plan in apps:
        if plan.note:
            logging.getLogger("detserve").warning(plan.note)
        deployment = DetectionServer.options(**plan.deployment_options())
        targets.append(serve.RunTarget(deployment.bind(args), name=name, route_prefix=f"/{name}", logging_config=logging_config))
    return run_targets(targets)


def start_serve(host: str, port: int, request_timeout_s: float, logging_config) -> None:
    from ray import serve

    serve_logger = logging.getLogger("ray.serve")
    serve_logger.setLevel(log_level())
    serve_logger.addFilter(_OwnServeNotice())
    serve.start(
        http_options={"host": host, "port": port, "request_timeout_s": request_timeout_s},
        proxy_location="HeadOnly",
        logging_config=logging_config,
    )


class DeployFailed(RuntimeError):
    """An application did not start; the message is one line: what failed, where."""


def run_targets(targets: list) -> list[str]:
    """Start the applications side by side (Serve is connected to once); returns their route prefixes.

    An adapter that cannot be imported or loaded fails its replicas; Serve then reports the application as
    failed with the replicas' tracebacks. :class:`DeployFailed` keeps the one line that says what and where.
    """
    from ray import serve

    try:
        serve.run_many(targets)
    except RuntimeError as exc:
        line = deploy_failure_line(str(exc)) or deploy_failure_line(_deployment_messages())
        if line is None:
            raise
        raise DeployFailed(line) from None
    return [t.route_prefix for t in targets]


def _deployment_messages() -> str:
    """What Serve says about every deployment (a failed replica's traceback among it)."""
    from ray import serve

    try:
        return "\n".join(d.message for app in serve.status().applications.values() for d in app.deployments.values())
    except Exception:  # Serve itself is gone: nothing more to say
        return ""


def deploy_failure_line(message: str) -> str | None:
    """The one line of a failed adapter application's report that names the file and the error, if there is one."""
    import re

    found = re.search(r"(?:AdapterError|AppError): ([^\n]+)", message)
    return found.group(1).strip() if found else None


def banner(routes: list[str], host: str, port: int, metrics_port: int, sample: Path, listening: str = "") -> list[str]:
    """The lines printed once the server is ready: URLs, a curl per app that works as printed, docs, metrics, and
    ``listening`` (:func:`exposure_line`)."""
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
        *([f"  listening  {listening}"] if listening else []),
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
        _address_file(ray_auth.run_dir()).unlink(missing_ok=True)


def main(
    config_path: Path | None = None, host: str = "127.0.0.1", port: int = 8000, only: list[str] | None = None,
    adapter: AdapterServing | None = None,
) -> None:
    """Serve the config's applications (or ``adapter``'s models) until Ctrl-C."""
    from detserve.runtime.defaults import sample_path
    from detserve.runtime.progress import console, step

    config_path = config_path or paths.deploy_config()
    if adapter is not None:
        from detserve.serve.app import AppArgs

        apps = adapter_apps(adapter)  # checks the folder and its models before Ray starts
        with step("Checking the adapter (import and load, as each replica will)"):
            check_adapter(adapter)
        set_proxy_body_limits({f"/{name}": AppArgs().max_body_bytes for name, _, _ in apps})
        set_route_timeouts({f"/{name}": adapter.request_timeout_s for name, _, _ in apps})
    else:
        config = load_config(config_path)
        set_proxy_body_limits(proxy_body_limits(config))
        set_route_timeouts(route_timeouts(config))
        for serving in config_adapters(config, only):
            with step(f"Checking the adapter in {serving.folder} (import and load, as each replica will)"):
                check_adapter(serving)
    with step("Starting Ray on 127.0.0.1"):
        start_ray()
    # Ctrl-C and SIGTERM both stop Serve and Ray. SIGINT explicitly: a
    # process started in the background by a shell inherits it ignored.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, lambda *_: (_ for _ in ()).throw(KeyboardInterrupt()))
    try:
        with step("Starting Serve and the applications (a replica loads its model)"):
            routes = deploy_adapter(adapter, host, port) if adapter is not None else deploy(config_path, host, port, only)
    except BaseException:
        shutdown()
        raise
    metrics_port = int(os.environ.get("DETSERVE_METRICS_PORT", "8080"))
    console.rule("[bold green]ready[/]")
    for line in banner(routes, host, port, metrics_port, sample_path(), exposure_line()):
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
