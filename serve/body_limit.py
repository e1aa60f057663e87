"""The body limit at the ingress: an upload over its route's limit is refused before the app reads it.

Ray 2.60's Python proxy reads the whole body from the client and forwards all of
it to the replica, whatever the app reads (the replica's ``ASGIReceiveProxy``
queues it unbounded), so an app that stops at its limit would still receive the
rest. :class:`BodyLimit` runs in the HTTP server that takes the request in (Ray's
proxy, or under HAProxy the replica's own server) in front of the app: a
Content-Length over the limit gets its 413 at once and the app never sees the
request; a chunked body is counted as it arrives and cut at the limit. Every
such 413 carries ``Connection: close``: the server stops reading the upload and
closes the connection, so a client that waits for the close is not left hanging
and the replica does not drain the rest of a 200 MiB body.

Under the HAProxy ingress (serve/ingress.py, the default) HAProxy itself refuses
a Content-Length over the limit, so such a request never reaches a replica's
Python; this middleware then only cuts chunked bodies. The limits are per route
prefix (serve/route_limits.py).
"""

from __future__ import annotations

from collections.abc import Mapping

from detserve.serve import protocol
from detserve.serve.route_limits import DEFAULT_MAX_BODY_BYTES, body_limits_from_env, limit_for

#: On every 413 of the body limit: the rest of the upload is not read.
CLOSE = {"connection": "close"}


def too_large(limit: int, length: int | None = None, received: int | None = None) -> tuple[str, str]:
    """(code, message) of a body over ``limit``: its Content-Length, or for a chunked body what had arrived when cut."""
    if length is not None:
        size = f"the body is {length} bytes (its Content-Length); the limit is {limit}"
    else:
        size = f"the body passed the limit of {limit} bytes: {received} bytes had arrived when it was cut (it was sent chunked, without a Content-Length)"
    return "body_too_large", f"{size}: send fewer or smaller images per request"


class BodyLimit:
    """Pure ASGI middleware: refuse a body over the route's limit, before the app reads it.

    Content-Length over the limit: a 413 at once, the app is not called. Otherwise the
    bytes are counted as they arrive; past the limit the client gets the 413 and the app
    (Ray's proxy forwarding to the replica, or the app itself) reads a disconnect, so it
    stops reading and drops what it holds.
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
            for message in protocol.asgi_messages(413, *too_large(limit, length=int(length)), CLOSE):
                await send(message)
            return
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
                        for one in protocol.asgi_messages(413, *too_large(limit, received=received), CLOSE):
                            await send(one)
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
