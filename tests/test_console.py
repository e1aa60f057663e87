"""What reaches the console of `detserve serve`: Ray's worker output, less the lines that are noise on one machine."""

from __future__ import annotations

import os
import time

import pytest

from detserve.serve.worker_logs import filtered, is_noise

NOISE = [
    "Corrupt JPEG data: premature end of data segment",
    "Corrupt JPEG data: 12 extraneous bytes before marker 0xd9",
    "Premature end of JPEG file",
    "WARNING 2026-12-07 19:07:54,633 controller 16728 -- HTTPOptions.host='127.0.0.1' won't accept connections from "
    "HAProxy on other nodes; cross-node routing will fail with connection refused.",
    "Task ServeController.graceful_shutdown failed. There are infinite retries remaining, so the task will be retried. "
    "Error: The actor is dead because it was killed by `ray.kill`.",
]
KEPT = ["Traceback (most recent call last):", "ERROR replica failed: Corrupt JPEG data is not an error of ours", "INFO ready"]


def test_the_known_noise_is_dropped_and_everything_else_kept():
    printed = []
    handler = filtered(printed.append)
    handler({"pid": 1, "is_err": True, "lines": NOISE + KEPT})
    handler({"pid": 1, "is_err": True, "lines": NOISE})  # nothing left: nothing printed
    assert printed == [{"pid": 1, "is_err": True, "lines": KEPT}]
    assert all(is_noise(line) for line in NOISE) and not any(is_noise(line) for line in KEPT)


@pytest.mark.serve
def test_a_workers_libjpeg_warning_stays_off_the_console_and_its_other_lines_reach_it(serve_cluster, capfd):
    import ray
    from ray._private import worker

    assert getattr(worker.print_worker_logs, "detserve_filtered", False)  # start_ray installed the filter

    @ray.remote
    def shout(marker: str) -> None:
        os.write(2, f"Corrupt JPEG data: premature end of data segment\n{marker}\n".encode())  # as libjpeg writes it

    marker = f"detserve-console-check-{time.time_ns()}"
    ray.get(shout.remote(marker))
    seen = ""
    for _ in range(100):  # the driver prints worker output from a thread, a moment later
        seen += capfd.readouterr().err
        if marker in seen:
            break
        time.sleep(0.1)
    assert marker in seen, "the worker's own line never reached the console"
    assert "Corrupt JPEG data" not in seen, seen
