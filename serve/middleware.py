"""The ASGI middleware stack Ray installs in front of every detserve application.

``RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH=detserve.serve.middleware:middlewares``
(set by ``detserve.runtime.offline.environment``, before Ray starts) makes Ray call
:func:`middlewares` in the HTTP server that takes requests in: Ray's Python proxy,
or under the HAProxy ingress (the default, serve/ingress.py) each replica's own
HTTP server, where HAProxy delivers the request. Each middleware has one job, in
its own module:

- serve/body_limit.py: a body over its route's limit is refused before the app reads it;
- serve/client_deadline.py: the client's deadline header is used or refused (422);
- serve/proxy_admission.py: a request that would miss its deadline is refused (503);
- serve/arrival.py: the request is stamped with its arrival time;
- serve/ray_errors.py: Ray's plain-text errors become detserve's JSON errors.
"""

from __future__ import annotations

from starlette.middleware import Middleware

IMPORT_PATH = "detserve.serve.middleware:middlewares"


def middlewares() -> list[Middleware]:
    """For ``RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH``: Ray calls this where requests come in.

    Ray wraps them in list order, so the last is outermost: the body limit sees a request first, then the
    deadline header's check, then admission, the arrival stamp, and Ray's own errors rewritten last.
    """
    from detserve.serve.arrival import ArrivalTime
    from detserve.serve.body_limit import BodyLimit
    from detserve.serve.client_deadline import ClientDeadline
    from detserve.serve.proxy_admission import ProxyAdmission
    from detserve.serve.ray_errors import JsonErrors

    return [Middleware(JsonErrors), Middleware(ArrivalTime), Middleware(ProxyAdmission), Middleware(ClientDeadline), Middleware(BodyLimit)]
