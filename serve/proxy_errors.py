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

Not covered: errors uvicorn makes before any ASGI app runs (a request line that
is not HTTP gets its ``400 Invalid HTTP request``); no middleware sees those.
"""

from __future__ import annotations

import json
import re
import time

from starlette.middleware import Middleware

IMPORT_PATH = "detserve.serve.proxy_errors:middlewares"
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


def middlewares() -> list[Middleware]:
    """For ``RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH``: Ray calls this in its proxy."""
    return [Middleware(JsonErrors), Middleware(ArrivalTime)]
