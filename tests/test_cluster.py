"""Autoscaling and a three-node Ray cluster (issue 10, items 5 and 6); `make test-slow`.

Each check runs in its own Python process (tests/cluster_checks.py), so its Ray
never meets the session Ray of tests/test_serve.py; the test asserts on the JSON
report that process prints last.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from tests.conftest import ROOT

pytestmark = [pytest.mark.slow, pytest.mark.serve]


def run_check(name: str, export: Path, timeout_s: float) -> dict:
    # A short run directory of its own: Ray puts its Unix sockets under it
    # (<dir>/session_<date>_<pid>/sockets/plasma_store), and a socket path over
    # 107 bytes fails; pytest's tmp_path is too long for that. Kept on failure, for the logs.
    run_dir = Path(tempfile.mkdtemp(prefix="dsr-", dir="/tmp"))
    env = {**os.environ, "DETSERVE_RAY_TMP": str(run_dir), "RAY_TMPDIR": str(run_dir)}
    try:
        done = subprocess.run(
            [sys.executable, "-m", "tests.cluster_checks", name, str(export)],
            cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout_s,
        )  # fmt: skip
    except subprocess.TimeoutExpired as exc:
        pytest.fail(f"{name} ran past {timeout_s} s; Ray's logs are in {run_dir}:\n{(exc.stdout or b'')[-3000:]!r}\n{(exc.stderr or b'')[-3000:]!r}")
    lines = [line for line in done.stdout.splitlines() if line.startswith("REPORT ")]
    assert done.returncode == 0 and lines, f"{name} failed (rc {done.returncode}; Ray's logs in {run_dir}):\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    shutil.rmtree(run_dir, ignore_errors=True)
    report = json.loads(lines[-1][len("REPORT ") :])
    print(name, json.dumps(report))
    return report


def test_autoscaling_adds_a_replica_under_load_and_drops_it_after_with_no_failed_request(yolo_export):
    report = run_check("autoscale", yolo_export, timeout_s=240)
    assert report["scale_up_s"] is not None, f"never reached {report['max_replicas']} replicas: {report['timeline']}"
    assert report["peak_replicas"] >= 2
    assert report["scale_down_s"] is not None, f"never went back to 1 replica: {report['timeline']}"
    assert report["final_replica_states"] == {"RUNNING": 1}
    # Every attempt of every request, during the scale-up and the drain: 200.
    for phase in ("heavy_attempts", "light_attempts"):
        assert set(report[phase]) == {"200"}, (phase, report[phase], report["samples"])
    assert report["heavy_attempts"]["200"] > 50 and report["light_attempts"]["200"] > 5


def test_three_node_cluster_spreads_replicas_and_survives_losing_a_worker(yolo_export):
    report = run_check("multinode", yolo_export, timeout_s=420)
    assert report["replica_nodes"] == ["w1", "w2"], report
    # No accepted request lost silently: each ended 200 (after client retries) or a JSON 503.
    assert set(report["final"]) <= {"200", "503-json"}, (report["final"], report["samples"])
    assert report["final"].get("200", 0) > report["requests_before_kill"] > 0
    assert report["after_recovery"] == {"200": 8}, report
    assert report["replacement_s"] is not None and report["replica_nodes_after"] == ["w2", "w3"], report
