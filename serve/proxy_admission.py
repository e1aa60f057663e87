"""Admission in front of the replica: refuse what the replicas' outlooks refuse, before the request costs them.

The rule and its arithmetic are the replica's (serve/scheduler.py, serve/admission.py). Every ``/predict``
answer carries the replica's :class:`~detserve.serve.admission.Outlook` (``x-detserve-admit``): refuse a
one-image request arriving before ``open_at``, or one whose client timeout ends before ``need_until``. The
ingress compares a request's arrival with it and does nothing else: no ledger of its own, no rates.

- **HAProxy** (the default ingress, serve/ingress.py) does the comparison in Lua
  (serve/haproxy_admission.lua, rendered with this module's constants by :func:`render_lua`), so most
  refusals under overload never reach Python.
- **Ray's Python proxy** (``DETSERVE_INGRESS=python``) does it in :class:`ProxyAdmission`, an ASGI middleware
  that Ray installs in its proxy (serve/proxy_errors.py). Under HAProxy the same middleware is installed in each
  replica's own HTTP server, where it only lets the header through to HAProxy.

Either refuses only when every replica of the route heard from within ``FRESH_S`` would refuse, with a JSON 503
``overloaded``, a ``Retry-After`` spread past ``open_at`` and ``x-detserve-refused-by``. An outlook only ages
towards leniency (the queue it describes drains), so the ingress lets through what the replica may still refuse,
and the replica's own check stays the bound.
"""

from __future__ import annotations

import json
import math
import os
import time
from pathlib import Path

from detserve.serve.admission import ADMIT_HEADER, FRESH_S, REFUSED_BY_HEADER, Outlook, retry_after_header

#: The client's deadline header (Ray's proxy honours it for its own timeout too).
TIMEOUT_HEADER = b"x-request-timeout-seconds"
#: Every refusal's message carries this, so clients and benchmarks can tell it from the replica's.
REFUSED_HERE = "refused at the ingress, before the app"
#: Set in every Ray process when HAProxy is the ingress (serve/ingress.py); then HAProxy compares, not this module.
HAPROXY_ENV = "RAY_SERVE_ENABLE_HA_PROXY"
#: Stands for the Retry-After seconds in :func:`refusal_body`'s text, for the Lua to fill in.
RETRY_SLOT = "RETRY_AFTER_SECONDS"


def parse_timeout(value: bytes | str | None) -> float | None:
    """A client's ``x-request-timeout-seconds`` in seconds, if it gave a usable one."""
    try:
        seconds = float(value) if value is not None else None
    except ValueError:
        return None
    return seconds if seconds is not None and math.isfinite(seconds) else None


def refusal_body(retry_after: str) -> bytes:
    """The JSON 503 of a refusal at the ingress (Python or HAProxy), with ``retry_after`` (whole seconds) in its text."""
    message = (
        f"the server is busy: every replica's queue is full for a request arriving now ({REFUSED_HERE}). "
        f"Retry after {retry_after} s (the Retry-After header), or send fewer images per request"
    )
    return json.dumps({"error": {"code": "overloaded", "message": message}}).encode()


def refusing(outlooks: dict[str, tuple[Outlook, float]], heard_now: float, now: float, client_timeout_s: float | None) -> Outlook | None:
    """The outlook to refuse by (the soonest to open), when every fresh one refuses; None to let the request through.

    ``outlooks``: replica -> (its latest outlook, when it was heard, on the ``heard_now`` clock).
    """
    fresh = [o for o, heard in outlooks.values() if heard_now - heard <= FRESH_S]
    if not fresh or not all(o.refuses(now, client_timeout_s) for o in fresh):
        return None
    return min(fresh, key=lambda o: o.open_at)


class ProxyAdmission:
    """Pure ASGI middleware for Ray's Python proxy: compare each ``POST .../predict`` with the replicas' outlooks."""

    def __init__(self, app, haproxy: bool | None = None, clock=time.monotonic, wall=time.time):
        self.app = app
        #: behind HAProxy (in a replica's own HTTP server): HAProxy compares; the header goes through to it
        self.haproxy = os.environ.get(HAPROXY_ENV) == "1" if haproxy is None else haproxy
        self.routes: dict[str, dict[str, tuple[Outlook, float]]] = {}
        self.clock, self.wall = clock, wall
        self.refused = 0

    async def __call__(self, scope, receive, send):
        path = scope.get("path", "").rstrip("/")
        if self.haproxy or scope["type"] != "http" or scope.get("method") != "POST" or not path.endswith("/predict"):
            return await self.app(scope, receive, send)
        outlooks = self.routes.setdefault(path, {})
        now = self.wall()
        timeout_s = parse_timeout(dict(scope.get("headers", [])).get(TIMEOUT_HEADER))
        client_s = timeout_s if timeout_s is not None and timeout_s > 0 else None  # the replica answers a bad one 422
        outlook = refusing(outlooks, self.clock(), now, client_s)
        if outlook is not None:
            self.refused += 1
            retry = retry_after_header(outlook.retry_after_s(now))
            payload = refusal_body(retry)
            await send({"type": "http.response.start", "status": 503, "headers": [
                (b"content-type", b"application/json"), (b"content-length", str(len(payload)).encode()),
                (b"retry-after", retry.encode()), (REFUSED_BY_HEADER.encode(), b"proxy"),
            ]})  # fmt: skip
            await send({"type": "http.response.body", "body": payload})
            return

        async def _send(message):
            if message["type"] == "http.response.start":
                kept = []
                for key, value in message.get("headers", []):
                    if key.lower() != ADMIT_HEADER.encode():
                        kept.append((key, value))
                    elif (heard := Outlook.parse(value)) is not None:
                        outlooks[heard.replica] = (heard, self.clock())
                message = {**message, "headers": kept}
            await send(message)

        await self.app(scope, receive, _send)


def render_lua() -> bytes:
    """serve/haproxy_admission.lua with this module's constants in front: they cross into Lua by generation, not copy."""
    template = refusal_body(RETRY_SLOT).decode()
    constants = {
        "HEADER": ADMIT_HEADER, "REFUSED_BY": REFUSED_BY_HEADER, "TIMEOUT_HEADER": TIMEOUT_HEADER.decode(),
        "RETRY_SLOT": RETRY_SLOT, "BODY": template,
    }  # fmt: skip
    lines = ["-- Generated by detserve.serve.proxy_admission.render_lua: constants from Python, then the Lua itself."]
    for name, value in constants.items():
        if "]==]" in value:
            raise ValueError(f"{name} cannot be a Lua long string: {value!r}")
        lines.append(f"local {name} = [==[{value}]==]")
    lines.append(f"local FRESH_S = {FRESH_S!r}")
    body = Path(__file__).with_name("haproxy_admission.lua").read_text()
    return ("\n".join(lines) + "\n\n" + body).encode()
