"""Each route's limits, handed to the ingress (the middleware in front of the app, HAProxy) through Ray's environment.

The ingress runs before any application code, in Ray's proxy or in a replica's own
HTTP server, so it cannot read an application's ``args``. ``detserve serve`` writes
every application's ``max_body_bytes`` and ``request_timeout_s`` into two variables
before Ray starts (every Ray process inherits them): JSON objects keyed by route
prefix, e.g. ``DETSERVE_PROXY_BODY_LIMITS={"/yolo": 52428800}`` and
``DETSERVE_ROUTE_TIMEOUTS={"/yolo": 30}``. A route they do not name gets the
defaults, which are ``AppArgs``'s.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping

#: JSON {route prefix: max body bytes}.
LIMITS_ENV = "DETSERVE_PROXY_BODY_LIMITS"
#: JSON {route prefix: request timeout in seconds}: the longest x-request-timeout-seconds the route accepts.
TIMEOUTS_ENV = "DETSERVE_ROUTE_TIMEOUTS"
#: The limit of a route the mapping does not name: AppArgs.max_body_bytes's default (50 MiB).
DEFAULT_MAX_BODY_BYTES = 50 * 1024 * 1024
#: The request timeout of a route the mapping does not name: AppArgs.request_timeout_s's default.
DEFAULT_REQUEST_TIMEOUT_S = 30.0


def _from_env(name: str, what: str, example: str, kind: type, environ: Mapping[str, str]) -> dict:
    text = environ.get(name, "").strip()
    if not text:
        return {}
    try:
        values = json.loads(text)
        ok = lambda v: type(v) is kind or (kind is float and type(v) is int)  # noqa: E731
        if not isinstance(values, dict) or not all(isinstance(k, str) and k.startswith("/") and ok(v) and v > 0 for k, v in values.items()):
            raise ValueError
    except ValueError:
        raise ValueError(f'{name}={text!r}: give JSON {{"/<route prefix>": <{what}>, ...}}, e.g. {example}') from None
    return {k: kind(v) for k, v in values.items()}


def body_limits_from_env(environ: Mapping[str, str] = os.environ) -> dict[str, int]:
    """``DETSERVE_PROXY_BODY_LIMITS`` as {route prefix: bytes}; a value that does not parse stops the ingress with the reason."""
    return _from_env(LIMITS_ENV, "max body bytes", '{"/yolo": 52428800}', int, environ)


def timeouts_from_env(environ: Mapping[str, str] = os.environ) -> dict[str, float]:
    """``DETSERVE_ROUTE_TIMEOUTS`` as {route prefix: seconds}; a value that does not parse stops the ingress with the reason."""
    return _from_env(TIMEOUTS_ENV, "request timeout seconds", '{"/yolo": 30}', float, environ)


def limit_for(path: str, limits: Mapping[str, float], default: float):
    """The value of the route that serves ``path``: the longest matching route prefix, as Ray's proxy routes."""
    best, limit = -1, default
    for prefix, value in limits.items():
        root = prefix.rstrip("/")
        if (path == prefix or path == root or path.startswith(root + "/")) and len(root) > best:
            best, limit = len(root), value
    return limit
