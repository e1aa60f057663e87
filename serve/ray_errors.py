"""Ray's own plain-text errors, rewritten into detserve's JSON error contract (serve/protocol.py).

The app answers its own errors as ``{"error": {"code", "message"}}`` (serve/http.py),
but some never reach it: Ray answers an unknown route (404), a full queue (503 or
429, with Retry-After), a deadline passed (408) and a replica that died
mid-request (500, often with no body at all) in plain text. :class:`JsonErrors`
(in the middleware stack, serve/middleware.py) rewrites every non-JSON error
into the contract's body, keeping the status and headers such as Retry-After.
JSON responses (the app's) and Ray's own ``/-/`` endpoints (healthz, routes)
pass through untouched.

Not covered: errors uvicorn makes before any ASGI app runs (a request line that
is not HTTP gets its ``400 Invalid HTTP request``); no middleware sees those.
"""

from __future__ import annotations

import re

from detserve.serve import protocol


def error_for(status: int, text: str, path: str, headers: dict[bytes, bytes], client_timeout: str | None = None) -> tuple[str, str]:
    """(code, message) for one of Ray's plain-text errors, from its status and text.

    ``client_timeout``: the request's x-request-timeout-seconds as the client sent it, for a 408's message.
    """
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
        if client_timeout is not None:
            within = f"the {client_timeout} s its {protocol.TIMEOUT_HEADER} header gave"
        else:
            match = re.search(r"after ([0-9.]+)\s*s", text)
            within = f"the server's request timeout of {match.group(1)} s" if match else "its deadline"
        return "timeout", (
            f"the request did not finish within {within}: retry when the server is less busy, "
            f"send fewer or smaller images, or give a longer {protocol.TIMEOUT_HEADER} header"
        )
    if status == 400:
        return "bad_http", "the request is not valid HTTP (its request line, headers or framing): let your HTTP client build it"
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
                await _send_error(send, held["start"], held["body"], scope)
                held.clear()
                return
            await send(message)

        await self.app(scope, receive, _send)
        if not started:  # the replica died before answering: Ray sends nothing
            await _send_error(send, {"status": 500, "headers": []}, b"", scope)


async def _send_error(send, start: dict, body: bytes, scope: dict) -> None:
    status = start["status"]
    headers = dict(start.get("headers", []))
    sent = dict(scope.get("headers", [])).get(protocol.TIMEOUT_HEADER.encode())
    client_timeout = sent.decode("latin-1") if sent is not None else None
    code, message = error_for(status, body.decode("utf-8", "replace"), scope.get("path", ""), headers, client_timeout)
    kept = {k.decode("latin-1"): v.decode("latin-1") for k, v in start.get("headers", []) if k.lower() not in (b"content-type", b"content-length")}
    for one in protocol.asgi_messages(status, code, message, kept):
        await send(one)
