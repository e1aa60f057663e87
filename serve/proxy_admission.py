"""Admission in front of the replica: refuse what the replicas' outlooks refuse, before the request costs them.

The rule and its arithmetic are the replica's (serve/scheduler.py, serve/admission.py). Every ``/predict``
answer carries the replica's :class:`~detserve.serve.admission.Outlook` (``x-detserve-admit``): refuse a
one-image request arriving before ``open_at``, or one whose client timeout ends before ``need_until``. The
ingress compares a request's arrival with it and does nothing else: no ledger of its own, no rates.

- **HAProxy** (the default ingress, serve/ingress.py) does the comparison in Lua
  (serve/haproxy_admission.lua, rendered with this module's constants by :func:`render_lua`), so most
  refusals under overload never reach Python.
- **Ray's Python proxy** (``DETSERVE_INGRESS=python``) does it in :class:`ProxyAdmission`, an ASGI middleware
  that Ray installs in its proxy (serve/middleware.py). Under HAProxy the same middleware is installed in each
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

from detserve.serve import protocol
from detserve.serve.admission import FRESH_S, Outlook, retry_after_header

#: Set in every Ray process when HAProxy is the ingress (serve/ingress.py); then HAProxy compares, not this module.
HAPROXY_ENV = "RAY_SERVE_ENABLE_HA_PROXY"


def refusal_messages(retry_after: str) -> list[dict]:
    """The ASGI messages of a refusal at the ingress: the registry's 503 ``overloaded``, with ``retry_after`` seconds."""
    message = protocol.overloaded_message(protocol.INGRESS_REFUSAL, retry_after)
    headers = {protocol.RETRY_AFTER_HEADER: retry_after, protocol.REFUSED_BY_HEADER: "proxy"}
    return protocol.asgi_messages(503, "overloaded", message, headers)


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
        # The deadline middleware, in front of this one, has already refused a header it cannot use (a 422).
        try:
            client_s = protocol.client_timeout_s(dict(scope.get("headers", [])).get(protocol.TIMEOUT_HEADER.encode()), math.inf)
        except protocol.DetserveError:
            client_s = None
        outlook = refusing(outlooks, self.clock(), now, client_s)
        if outlook is not None:
            self.refused += 1
            for message in refusal_messages(retry_after_header(outlook.retry_after_s(now))):
                await send(message)
            return

        async def _send(message):
            if message["type"] == "http.response.start":
                kept = []
                for key, value in message.get("headers", []):
                    if key.lower() != protocol.ADMIT_HEADER.encode():
                        kept.append((key, value))
                    elif (heard := Outlook.parse(value)) is not None:
                        outlooks[heard.replica] = (heard, self.clock())
                message = {**message, "headers": kept}
            await send(message)

        await self.app(scope, receive, _send)


def render_lua() -> bytes:
    """serve/haproxy_admission.lua with this module's constants in front: they cross into Lua by generation, not copy.

    The registry's own prelude (``protocol.lua_prelude``: header names, the error body, the 503's text) goes before
    this (serve/ingress.py writes both).
    """
    constants = {"HEADER": protocol.ADMIT_HEADER}
    lines = ["-- Generated by detserve.serve.proxy_admission.render_lua: constants from Python, then the Lua itself."]
    lines += [f"local {name} = {json.dumps(value)}" for name, value in constants.items()]
    lines.append(f"local FRESH_S = {FRESH_S!r}")
    body = Path(__file__).with_name("haproxy_admission.lua").read_text()
    return ("\n".join(lines) + "\n\n" + body).encode()
