"""The client's deadline header, checked at the ingress: refused at once when invalid or when no time is left.

Every ``x-request-timeout-seconds`` is either used or refused with a 422 that names
the header and says what is accepted (serve/protocol.py, :func:`client_timeout_s`:
a plain decimal number greater than 0 and at most the route's request timeout).
:class:`ClientDeadline` applies that check in front of admission and of Ray, which
reads the same header for its own timer (a value of 0 or less would switch that
timer off, and an unreadable one would be ignored). A valid deadline no request
can meet, because it leaves nothing once the server's margin for the answer's way
back is taken (``ANSWER_BEFORE_TIMEOUT_S``), is refused at once with 422
``deadline_too_short``: otherwise Ray's timer would answer it a 408 ``timeout``
a few milliseconds later, after the request had started.

The app checks the header with the same function (serve/app.py), for requests that
reach it without this middleware (tests, other ingresses).
"""

from __future__ import annotations

from collections.abc import Mapping

from detserve.serve import protocol
from detserve.serve.route_limits import DEFAULT_REQUEST_TIMEOUT_S, limit_for, timeouts_from_env
from detserve.serve.admission import ANSWER_BEFORE_TIMEOUT_S, request_budget_s

_HEADER = protocol.TIMEOUT_HEADER.encode()


def too_short_message(sent: str, margin_s: float = ANSWER_BEFORE_TIMEOUT_S) -> str:
    """The 422 ``deadline_too_short`` of a deadline that leaves no time once the margin is taken."""
    return (f"{protocol.TIMEOUT_HEADER}: {sent} leaves no time to work: the server answers {margin_s:g} s before a "
            f"deadline, so that the answer can travel back in time; send more than {margin_s:g} s, "
            "with room for the images' decode and inference")  # fmt: skip


def deadline_s(headers: Mapping[bytes, bytes], max_s: float) -> float | None:
    """The request's deadline header in seconds (None without one), or the 422 it earns: ``invalid_deadline``, or
    ``deadline_too_short`` when it leaves no time once the margin is taken."""
    sent = headers.get(_HEADER)
    seconds = protocol.client_timeout_s(sent, max_s)
    if seconds is not None and request_budget_s(max_s, seconds) <= 0:
        raise protocol.error("deadline_too_short", too_short_message(sent.decode("latin-1")))
    return seconds


class ClientDeadline:
    """Pure ASGI middleware: a request's ``x-request-timeout-seconds`` is checked before anything else uses it."""

    def __init__(self, app, timeouts: Mapping[str, float] | None = None, default: float = DEFAULT_REQUEST_TIMEOUT_S):
        self.app = app
        self.timeouts = timeouts_from_env() if timeouts is None else dict(timeouts)
        self.default = default

    async def __call__(self, scope, receive, send):
        path = scope.get("path", "")
        if scope["type"] != "http" or path.startswith("/-/"):
            return await self.app(scope, receive, send)
        try:
            deadline_s(dict(scope.get("headers", [])), limit_for(path, self.timeouts, self.default))
        except protocol.DetserveError as problem:
            for message in problem.asgi_messages():
                await send(message)
            return
        return await self.app(scope, receive, send)
