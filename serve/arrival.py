"""The arrival stamp: when the server received a request, so a replica counts a client's deadline from then.

The ingress (Ray's proxy, or under HAProxy the replica's own HTTP server) stamps each
request with the time it arrived (``x-detserve-received-at``); the replica's deadline
counts from it, not from when the request reached the replica: under a burst, the
hop from the proxy to the replica takes a share of the deadline the replica could
not otherwise see. A client's own stamp is replaced.
"""

from __future__ import annotations

import time

from detserve.serve.protocol import RECEIVED_AT_HEADER as _NAME

#: Wall-clock seconds (time.time()) at which the ingress received the request; set only by the ingress.
RECEIVED_AT_HEADER = _NAME.encode()


class ArrivalTime:
    """Pure ASGI middleware: stamp the request with the ingress's arrival time (a client's own stamp is replaced)."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http":
            headers = [(k, v) for k, v in scope.get("headers", []) if k.lower() != RECEIVED_AT_HEADER]
            headers.append((RECEIVED_AT_HEADER, repr(time.time()).encode()))
            scope = {**scope, "headers": headers}
        return await self.app(scope, receive, send)
