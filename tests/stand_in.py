"""A stand-in HTTP server on loopback (aiohttp) for the tests of clients and load generators that need no Ray."""

from __future__ import annotations

from typing import Awaitable, Callable

from aiohttp import web

from detserve.benchmarks.ports import free_port

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


async def start(*routes: tuple[str, str, Handler], client_max_size: int = 1024**2) -> tuple[web.AppRunner, str]:
    """Serve ``routes`` ((method, path, handler), ...) on a free 127.0.0.1 port; returns (runner, base URL).
    End it with ``await runner.cleanup()``."""
    app = web.Application(client_max_size=client_max_size)
    for method, path, handler in routes:
        app.router.add_route(method, path, handler)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    port = free_port()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    return runner, f"http://127.0.0.1:{port}"
