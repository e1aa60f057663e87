"""Stopping: an idle server stops at once (Ctrl-C within 10 s, nothing left behind); a drain waits only for admitted work.

Ray's direct ingress keeps a stopping replica reachable for a deregistration window
(``RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S``, 30 s) whatever it holds; on one node
HAProxy needs none, and ``detserve serve`` sets it to 0 (serve/run.py ``SINGLE_NODE_ENV``).
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import textwrap
import time

import psutil
import pytest

from tests.conftest import QUIET, free_port

pytestmark = pytest.mark.serve


@pytest.mark.slow  # 7 s: an application of its own, deleted (make test-slow)
def test_an_idle_application_is_deleted_without_waiting_out_a_drain_window(serve_cluster):
    import httpx
    from ray import serve

    @serve.deployment(graceful_shutdown_timeout_s=30, graceful_shutdown_wait_loop_s=0.2)
    class Idle:
        async def __call__(self, request) -> str:
            return "idle"

    serve.run(Idle.bind(), name="idle", route_prefix="/idle", logging_config=QUIET)
    assert httpx.get(f"{serve_cluster}/idle", timeout=30).text == "idle"
    started = time.monotonic()
    serve.delete("idle")  # waits until the replica is gone
    took = time.monotonic() - started
    # With Ray's window a replica stays up 30 s; the drain itself is bounded by graceful_shutdown_timeout_s (30 s),
    # which an idle replica does not use.
    assert took < 10, took


@pytest.mark.slow
def test_ctrl_c_on_an_idle_detserve_serve_returns_within_10_s_and_leaves_no_process(yolo_export, tmp_path):
    """The whole `detserve serve` (Ray, HAProxy, one replica): SIGINT to its process group, as a terminal's Ctrl-C."""
    config = tmp_path / "deploy.yaml"
    config.write_text(textwrap.dedent(f"""\
        http_options: {{host: 127.0.0.1, port: 8000, request_timeout_s: 30}}
        applications:
          - name: yolo
            route_prefix: /yolo
            import_path: detserve.serve.app:build_app
            args: {{model: "{yolo_export}"}}
            deployments:
              - name: DetectionServer
                num_replicas: 1
                graceful_shutdown_timeout_s: 30
        """))
    port = free_port()
    run_dir = tempfile.mkdtemp(prefix="ds-ctrl-c-")  # short: Ray's unix socket paths under it have at most 107 bytes
    env = {**os.environ, "DETSERVE_RAY_TMP": run_dir, "DETSERVE_METRICS_PORT": str(free_port())}
    env.pop("DETSERVE_PROXY_BODY_LIMITS", None)
    env.pop("DETSERVE_ROUTE_TIMEOUTS", None)
    log = tmp_path / "serve.log"
    with open(log, "w") as out:
        child = subprocess.Popen([sys.executable, "-m", "detserve", "serve", "--config", str(config), "--port", str(port)],
                                 stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True)  # fmt: skip
    try:
        deadline = time.monotonic() + 240
        while "Ctrl-C stops" not in log.read_text():
            assert child.poll() is None and time.monotonic() < deadline, log.read_text()[-3000:]
            time.sleep(0.5)
        group = {p.pid for p in psutil.process_iter() if _group(p) == child.pid}
        assert len(group) > 5, group  # Ray's processes and HAProxy run in the server's process group
        time.sleep(2)
        started = time.monotonic()
        os.killpg(child.pid, signal.SIGINT)
        child.wait(timeout=60)
        took = time.monotonic() - started
        time.sleep(1)
        left = [p.info for p in psutil.process_iter(["pid", "cmdline", "status"]) if p.pid in group and p.info["status"] != psutil.STATUS_ZOMBIE]
    finally:
        if child.poll() is None:
            os.killpg(child.pid, signal.SIGKILL)
        shutil.rmtree(run_dir, ignore_errors=True)
    text = log.read_text()
    assert took < 10, (took, text[-2000:])
    assert not left, left
    assert "stopped." in text and "Traceback" not in text, text[-2000:]
    # What an idle stop printed: nothing of Ray's about the controller it had to kill, nor HAProxy's multi-node advice.
    assert "failed to shut down" not in text and "won't accept connections from HAProxy" not in text, text[-2000:]


def _group(process: psutil.Process) -> int | None:
    try:
        return os.getpgid(process.pid)
    except (ProcessLookupError, PermissionError):
        return None


def test_single_node_serve_sets_no_deregistration_window():
    from detserve.serve import ingress, run

    assert run.SINGLE_NODE_ENV == {"RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S": "0"}
    # A cluster's exports keep Ray's window: HAProxy on the other nodes needs it to stop routing to a leaving replica.
    assert "RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S" not in ingress.environment({})
