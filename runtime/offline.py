"""The one place that keeps detserve, and the libraries it drives, off the network.

Every entry point (the CLI, the Serve app, the tests, the benchmarks) calls
:func:`apply` before importing onnxruntime, ultralytics, ray or dtlpy. Each
setting below closes a connection that was seen with strace on these machines
(see ``../shared/NOTES.md``); the comment says which.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

#: Where detserve keeps its writable state (Ultralytics settings, dtlpy files,
#: Ray temp files). Override with ``DETSERVE_HOME``.
HOME = Path(os.environ.get("DETSERVE_HOME", Path.cwd() / ".cache" / "detserve")).resolve()


def environment() -> dict[str, str]:
    """The environment variables that keep every library offline.

    Returned as a dict so that Ray's ``runtime_env`` (deploy.yaml) and
    subprocesses can carry the same settings.
    """
    return {
        # onnxruntime resolves its telemetry host from native code;
        # disable_telemetry_events() does not stop it, this variable does.
        "ORT_DISABLE_TELEMETRY": "1",
        # Ultralytics: no hub, no pip auto-install of missing packages, settings
        # kept in our folder (with sync off, written by ensure_ultralytics_files).
        "YOLO_OFFLINE": "1",
        "YOLO_AUTOINSTALL": "0",
        "YOLO_VERBOSE": os.environ.get("YOLO_VERBOSE", "0"),
        "YOLO_CONFIG_DIR": str(HOME / "ultralytics"),
        # Ray: no usage stats, no report host.
        "RAY_USAGE_STATS_ENABLED": "0",
        # Ray: loopback only. Ray turns _node_ip_address="127.0.0.1" into the
        # machine's own address (and then binds GCS, raylet, workers and agents
        # to it or to every interface) unless this is 0 when ray is imported.
        LOOPBACK_SWITCH: "0",
        # Ray: token authentication on every Ray RPC. The token file is the run
        # directory's (serve/ray_auth.py); Ray never writes ~/.ray/auth_token while
        # RAY_AUTH_TOKEN_PATH is set. RAY_AUTH_MODE=disabled opts out (loopback only then).
        "RAY_AUTH_MODE": "token",
        "RAY_USAGE_STATS_REPORT_URL": "http://127.0.0.1:9/",
        "RAY_DEDUP_LOGS": "0",
        # Ray Serve answers unknown routes, overload, timeouts and dead replicas in
        # plain text; this middleware stack (imported by name, so no layer is
        # crossed) gives them detserve's JSON error body, and applies the body
        # limit and the deadline header's check where requests come in. Read at
        # start, so it must be in the environment before ray.init.
        "RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH": "detserve.serve.middleware:middlewares",
        # Serve's controller loops every 0.1 s by default. At 0.5 s it took 1.2 % of a core instead of 2.8 %, and
        # the GCS it polls 0.6 % instead of 1.4 %: 2.6 % more images/s for the engine at 640 px on 2 cores
        # (docs/benchmarks.md). Deploys, scaling decisions and replica restarts start up to 0.4 s later.
        "RAY_SERVE_CONTROL_LOOP_INTERVAL_S": os.environ.get("RAY_SERVE_CONTROL_LOOP_INTERVAL_S", "0.5"),
        # dtlpy writes ~/.dataloop otherwise.
        "DATALOOP_PATH": str(HOME / "dataloop"),
        # torch hub / huggingface: never download.
        "TORCH_HOME": str(HOME / "torch"),
        "HF_HUB_OFFLINE": "1",
        # OpenCV's own threads oversubscribe 2-core machines.
        "OPENCV_NUM_THREADS": os.environ.get("OPENCV_NUM_THREADS", "1"),
    }


#: The loopback switch of :func:`environment`. A node of a cluster of several machines must not have it:
#: Ray then binds to 127.0.0.1, and ``ray start --address`` refuses to join a worker node with it.
LOOPBACK_SWITCH = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"


def shell_exports(cluster: bool = False) -> str:
    """:func:`environment` as ``export`` lines for a shell, e.g. before ``ray start`` or ``serve run``.

    ``cluster``: for the nodes of a Ray cluster of several machines, without the
    loopback switch. ``RAY_AUTH_MODE=token`` stays: give every node (and every
    ``serve deploy``) the same token with ``RAY_AUTH_TOKEN_PATH`` or ``RAY_AUTH_TOKEN``;
    without one Ray's GCS stops at start.
    """
    import shlex

    env = environment()
    if cluster:
        env.pop(LOOPBACK_SWITCH)
    return "".join(f"export {key}={shlex.quote(value)}\n" for key, value in env.items())


def _ensure_ultralytics_files(config_dir: Path) -> None:
    # Ultralytics checks for Arial.ttf and downloads it from github.com even in
    # offline mode; a font of that name in its config folder stops the check.
    font_dir = config_dir / "Ultralytics"
    font_dir.mkdir(parents=True, exist_ok=True)
    font = font_dir / "Arial.ttf"
    if not font.exists():
        import matplotlib

        dejavu = Path(matplotlib.get_data_path()) / "fonts" / "ttf" / "DejaVuSans.ttf"
        shutil.copyfile(dejavu, font)
    settings = font_dir / "settings.json"
    if not settings.exists():
        settings.write_text('{"sync": false, "hub": false}\n')


def _ensure_ray_bootstrap() -> None:
    # Ray's dashboard probes cloud metadata hosts at start; a bootstrap config
    # that says the provider is local stops it. Only written when absent.
    bootstrap = Path.home() / "ray_bootstrap_config.yaml"
    if not bootstrap.exists():
        try:
            bootstrap.write_text("provider:\n  type: local\n")
        except OSError:
            pass


def apply() -> dict[str, str]:
    """Set the offline environment in this process (idempotent) and return it."""
    env = environment()
    for key, value in env.items():
        os.environ.setdefault(key, value)
    HOME.mkdir(parents=True, exist_ok=True)
    Path(os.environ["DATALOOP_PATH"]).mkdir(parents=True, exist_ok=True)
    _ensure_ultralytics_files(Path(os.environ["YOLO_CONFIG_DIR"]))
    _ensure_ray_bootstrap()
    return {key: os.environ[key] for key in env}


if __name__ == "__main__":  # python -m detserve.runtime.offline [--cluster]: print the exports
    import sys

    print(shell_exports(cluster="--cluster" in sys.argv[1:]), end="")
