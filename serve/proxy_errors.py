"""JSON error bodies for the errors Ray Serve's HTTP proxy makes itself.

The app answers its own errors as ``{"error": {"code", "message"}}``
(serve/http.py), but some never reach it: Ray's proxy answers an unknown route
(404), a full queue (503 or 429, with Retry-After), a deadline passed (408) and
a replica that died mid-request (500, often with no body at all) in plain text.
This ASGI middleware, installed in the proxy by
``RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH=detserve.serve.proxy_errors:middlewares``
(set by ``detserve.runtime.offline.environment``, before Ray starts), rewrites
every non-JSON error into the same body, keeping the status and headers such
as Retry-After. JSON responses (the app's) and Ray's own ``/-/`` endpoints
(healthz, routes) pass through untouched.

The proxy also stamps each request with the time it arrived
(``x-detserve-received-at``, :class:`ArrivalTime`), so that a replica counts a
client's deadline from when the server got the request, not from when the
request reached the replica: under a burst, the hop from the proxy to the
replica takes a share of the deadline that the replica could not see.

The proxy enforces the body limit too (:class:`BodyLimit`), before a byte reaches
a replica: Ray 2.60's proxy reads the whole body from the client and forwards
all of it to the replica, whatever the app reads (the replica's
``ASGIReceiveProxy`` queues it unbounded), so an app that stops at its limit
still received the rest. A Content-Length over the limit gets its 413 at once,
and the replica never sees the request; a chunked body is counted as it
arrives and cut at the limit. The limits are per route prefix, from
``DETSERVE_PROXY_BODY_LIMITS`` (JSON ``{"/yolo": 52428800, ...}``, set by
``detserve serve`` from each application's ``max_body_bytes``, before Ray
starts); other routes get ``DEFAULT_MAX_BODY_BYTES``. Ray's proxy logs each cut
upload at INFO as "Client for request ... disconnected": the disconnect it sees
is this middleware's.

Under the HAProxy ingress (serve/ingress.py, the default) Ray installs the same
middlewares in each replica's own HTTP server, where HAProxy delivers the
request. The body limit then cuts the upload in the replica's process, before
the app reads it; the replica's memory stays flat under oversized chunked
uploads there too (tests/test_serve.py, which runs on the default ingress).
HAProxy's own errors get the same JSON from the error files ingress.py writes.

Not covered: errors uvicorn makes before any ASGI app runs (a request line that
is not HTTP gets its ``400 Invalid HTTP request``); no middleware sees those.
"""

from __future__ import annotations

import json
import os
import re
import time
from typing import Mapping

from starlette.middleware import Middleware

IMPORT_PATH = "detserve.serve.proxy_errors:middlewares"
#: JSON {route prefix: max body bytes}, read by the proxy when it starts (Ray's own environment).
LIMITS_ENV = "DETSERVE_PROXY_BODY_LIMITS"
#: The limit of a route the mapping does not name: AppArgs.max_body_bytes's default (50 MiB).
DEFAULT_MAX_BODY_BYTES = 50 * 1024 * 1024
#: Wall-clock seconds (time.time()) at which the proxy received the request; set only by the proxy.
RECEIVED_AT_HEADER = b"x-detserve-received-at"


def error_for(status: int, text: str, path: str, headers: dict[bytes, bytes]) -> tuple[str, str]:
    """(code, message) for one of Ray's plain-text errors, from its status and text."""
    if status == 404:
        return "not_found", (
            f"no application is served at {path}: GET /-/routes lists the route prefixes; "
            "detection is POST <prefix>/predict (e.g. /yolo/predict)"
        )
    if status in (429, 503):
        retry = headers.get(b"retry-after", b"").decode() or "a few"
        if "backpressure" in text.lower() or status == 429:
            return "overloaded", f"the server's queue is full: retry after {retry} second(s), or send fewer requests at once"
        return "unavailable", f"no replica can take the request now (starting or restarting): retry after {retry} second(s)"
    if status == 408:
        match = re.search(r"after ([0-9.]+)\s*s", text)
        after = f" of {match.group(1)} s" if match else ""
        return "timeout", (
            f"the request did not finish within its deadline{after}: retry when the server is less busy, "
            "send fewer or smaller images, or give a longer x-request-timeout-seconds header"
        )
    if status >= 500:
        return "internal", "the replica serving this request failed (Serve restarts it): retry; report it if it repeats"
    return f"http_{status}", text.strip()[:200] or f"HTTP {status}"


class JsonErrors:
    """Pure ASGI middleware: every error response that is not JSON becomes the detserve error body."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope.get("path", "").startswith("/-/"):
            return await self.app(scope, receive, send)
        held: dict = {}  # the start message of an error being rewritten, and its body so far
        started = False

        async def _send(message):
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
                headers = dict(message.get("headers", []))
                if message["status"] >= 400 and not headers.get(b"content-type", b"").startswith(b"application/json"):
                    held.update(start=message, body=b"")
                    return
            elif message["type"] == "http.response.body" and held:
                held["body"] += message.get("body", b"")
                if message.get("more_body", False):
                    return
                await _send_error(send, held["start"], held["body"], scope.get("path", ""))
                held.clear()
                return
            await send(message)

        await self.app(scope, receive, _send)
        if not started:  # the replica died before answering: Ray sends nothing
            await _send_error(send, {"status": 500, "headers": []}, b"", scope.get("path", ""))


async def _send_error(send, start: dict, body: bytes, path: str) -> None:
    status = start["status"]
    headers = dict(start.get("headers", []))
    code, message = error_for(status, body.decode("utf-8", "replace"), path, headers)
    payload = json.dumps({"error": {"code": code, "message": message}}).encode()
    kept = [(k, v) for k, v in start.get("headers", []) if k.lower() not in (b"content-type", b"content-length")]
    kept += [(b"content-type", b"application/json"), (b"content-length", str(len(payload)).encode())]
    await send({"type": "http.response.start", "status": status, "headers": kept})
    await send({"type": "http.response.body", "body": payload})


class ArrivalTime:
    """Pure ASGI middleware: stamp the request with the proxy's arrival time (a client's own stamp is replaced)."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http":
            headers = [(k, v) for k, v in scope.get("headers", []) if k.lower() != RECEIVED_AT_HEADER]
            headers.append((RECEIVED_AT_HEADER, repr(time.time()).encode()))
            scope = {**scope, "headers": headers}
        return await self.app(scope, receive, send)


def body_limits_from_env(environ: Mapping[str, str] = os.environ) -> dict[str, int]:
    """``DETSERVE_PROXY_BODY_LIMITS`` as {route prefix: bytes}; a value that does not parse stops the proxy with the reason."""
    text = environ.get(LIMITS_ENV, "").strip()
    if not text:
        return {}
    try:
        limits = json.loads(text)
        if not isinstance(limits, dict) or not all(isinstance(k, str) and k.startswith("/") and type(v) is int and v > 0 for k, v in limits.items()):
            raise ValueError
    except ValueError:
        raise ValueError(f'{LIMITS_ENV}={text!r}: give JSON {{"/<route prefix>": <max body bytes>, ...}}, e.g. {{"/yolo": 52428800}}') from None
    return limits


def limit_for(path: str, limits: Mapping[str, int], default: int = DEFAULT_MAX_BODY_BYTES) -> int:
    """The body limit of the route that serves ``path``: the longest matching route prefix, as Ray's proxy routes."""
    best, limit = -1, default
    for prefix, value in limits.items():
        root = prefix.rstrip("/")
        if (path == prefix or path == root or path.startswith(root + "/")) and len(root) > best:
            best, limit = len(root), value
    return limit


def _too_large(length: int | None, limit: int) -> tuple[str, str]:
    size = f"{length} bytes" if length is not None else f"over {limit} bytes"
    return "body_too_large", f"the body is {size}; the limit is {limit}: send fewer or smaller images per request"


class BodyLimit:
    """Pure ASGI middleware: refuse a body over the route's limit in the HTTP server that takes the request in
    (Ray's proxy, or under HAProxy the replica's own), before the app reads it.

    Content-Length over the limit: a 413 at once, the app is not called. Otherwise the
    bytes are counted as they arrive; past the limit the client gets the 413 and the app
    (Ray's proxy, forwarding to the replica) reads a disconnect, so it stops forwarding
    and cancels the replica's call. uvicorn then discards the rest of the upload.
    """

    def __init__(self, app, limits: Mapping[str, int] | None = None, default: int = DEFAULT_MAX_BODY_BYTES):
        self.app = app
        self.limits = body_limits_from_env() if limits is None else dict(limits)
        self.default = default

    async def __call__(self, scope, receive, send):
        path = scope.get("path", "")
        if scope["type"] != "http" or path.startswith("/-/"):
            return await self.app(scope, receive, send)
        limit = limit_for(path, self.limits, self.default)
        length = dict(scope.get("headers", [])).get(b"content-length", b"")
        if length.isdigit() and int(length) > limit:
            return await _send_json(send, 413, *_too_large(int(length), limit))
        received = 0
        refused = False  # this middleware answered; whatever the app sends after is dropped
        app_started = False

        async def _receive():
            nonlocal received, refused
            if refused:
                return {"type": "http.disconnect"}
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > limit:
                    if not app_started:  # the app answered first (its own, lower limit): keep its answer
                        refused = True
                        await _send_json(send, 413, *_too_large(None, limit))
                    return {"type": "http.disconnect"}
            return message

        async def _send(message):
            nonlocal app_started
            if refused:
                return
            if message["type"] == "http.response.start":
                app_started = True
            await send(message)

        await self.app(scope, _receive, _send)


async def _send_json(send, status: int, code: str, message: str) -> None:
    payload = json.dumps({"error": {"code": code, "message": message}}).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(payload)).encode())]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": payload})


def middlewares() -> list[Middleware]:
    """For ``RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH``: Ray calls this in its proxy.

    Ray wraps them in list order, so the last is outermost: the body limit sees a request first, then
    admission (serve/proxy_admission.py; imported here, since it answers in this module's JSON contract).
    """
    from detserve.serve.proxy_admission import ProxyAdmission

    return [Middleware(JsonErrors), Middleware(ArrivalTime), Middleware(ProxyAdmission), Middleware(BodyLimit)]
