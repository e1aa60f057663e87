"""Which lines of Ray's worker output reach the console of ``detserve serve``.

Ray copies every worker's stdout and stderr to the driver's console (``log_to_driver``).
Two kinds of line there are noise on one machine, and alarming noise:

- libjpeg's warnings ("Corrupt JPEG data: ...", "Premature end of JPEG file"). OpenCV's
  decoder prints them to stderr for a damaged JPEG it still decodes (runtime/images.py
  decides what then happens to the file; the user gets a 400 or the boxes, never these
  lines), and OpenCV has no setting to silence them;
- Serve's warning that ``HTTPOptions.host='127.0.0.1'`` "won't accept connections from
  HAProxy on other nodes" and its advice to bind 0.0.0.0: ``detserve serve`` runs one
  node, where HAProxy and every replica are on this machine;
- at Ctrl-C, the raylet's notes that a ``ServeController`` task "failed" because
  Serve killed the controller once it had shut down (``serve.shutdown`` does that).

:func:`drop_known_noise` filters them out of what the driver prints. They stay in Ray's
log files (``<run dir>/session_*/logs``), where nothing is lost for debugging.
"""

from __future__ import annotations

import re

#: Lines (after Ray's prefix) that never reach the console.
NOISE = re.compile(
    r"^(Corrupt JPEG data: |Premature end of JPEG file$|Invalid SOS parameters for sequential JPEG$"
    r"|Warning: unknown JFIF revision number |Inconsistent progression sequence for component )"
    r"|HTTPOptions\.host=.* won't accept connections from HAProxy on other nodes"
    r"|Task ServeController\.\w+ failed\. .*killed by `ray\.kill`"
)


def is_noise(line: str) -> bool:
    return NOISE.search(line) is not None


def filtered(printer):
    """``printer`` (Ray's ``print_worker_logs(batch, file, ...)``), fed only the lines of a batch that are not noise."""

    def print_worker_logs(batch: dict, *args, **kwargs):
        lines = [line for line in batch.get("lines", []) if not is_noise(line)]
        if lines:
            return printer({**batch, "lines": lines}, *args, **kwargs)
        return None

    print_worker_logs.detserve_filtered = True
    return print_worker_logs


def drop_known_noise() -> bool:
    """Keep the :data:`NOISE` lines off this driver's console; returns whether Ray's printer was found.

    Every line Ray prints for its workers and for the raylet goes through
    ``ray._private.worker.print_worker_logs`` (Ray 2.60; looked up when called), so it is wrapped there.
    """
    from ray._private import worker

    printer = getattr(worker, "print_worker_logs", None)
    if printer is None:
        return False
    if not getattr(printer, "detserve_filtered", False):
        worker.print_worker_logs = filtered(printer)
    return True
