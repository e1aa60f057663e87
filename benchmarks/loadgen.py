"""A bounded, loopback-only load generator with perf_analyzer-style measurement windows.

One measurement point, step by step (``measure``):

    warm-up (excluded) -> window 1 -> window 2 -> ... until the last 3 windows agree
    (throughput and p99 within ``tolerance`` of their mean) or ``max_windows`` is hit
    -> drain -> a ``PointResult`` over the last 3 windows (``stable`` says which).

Load comes in two shapes: ``ClosedLoop(concurrency)`` keeps N requests in
flight (a new one as soon as one returns); ``OpenLoop(rate)`` sends at Poisson
arrival times whatever the server does, and measures latency from the *planned*
send time so a slow server cannot hide its queue (no coordinated omission).
``burst(send, n)`` is the third, outside the windows: n requests at once, one
result each (the overload benchmark's burst).

Every point is bounded twice: in requests (``max_requests``) and in seconds
(``max_seconds``). Targets must be loopback IP literals (``require_loopback``):
this tool never sends traffic off the machine.

The transport is a coroutine ``send(i) -> status`` (an HTTP status, or
``"exc:<Type>"``), so the same windows measure HTTP (``http_sender``, aiohttp)
and in-process calls (a Ray Serve handle). Client CPU is the process CPU time
over the measured wall time; server counters come from an optional ``stats``
coroutine that returns detserve's ``/stats`` shape (``diff_stats``).
"""

from __future__ import annotations

import asyncio
import ipaddress
import math
import random
import time
import urllib.parse
from dataclasses import asdict, dataclass, field
from typing import Any, Awaitable, Callable, Sequence

Status = int | str
Sender = Callable[[int], Awaitable[Status]]
StatsSource = Callable[[], Awaitable[dict | None]]
CpuSource = Callable[[], float | None]

STAGES = ("decode", "queue_wait", "engine", "postprocess", "encode")


def log(message: str) -> None:
    """A benchmark's progress line, flushed at once (its output is often piped)."""
    print(message, flush=True)


class NonLoopbackHost(ValueError):
    """The target is not a loopback address; the load generator refuses it."""


def require_loopback(url: str) -> str:
    """Return ``url`` (without a trailing slash) if its host is a loopback IP literal; raise otherwise.

    Names are refused too, ``localhost`` included: a name resolves through
    /etc/hosts or DNS and could leave the machine. Use ``http://127.0.0.1:PORT``.
    """
    parts = urllib.parse.urlsplit(url)
    if parts.scheme != "http":
        raise NonLoopbackHost(f"{url!r}: only plain http:// to a loopback address is allowed (e.g. http://127.0.0.1:8000)")
    host = parts.hostname or ""
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        raise NonLoopbackHost(f"{url!r}: host {host!r} is not a loopback IP literal; use http://127.0.0.1:PORT") from None
    if not ip.is_loopback:
        raise NonLoopbackHost(f"{url!r}: {host} is not a loopback address; load tests target 127.0.0.1 only")
    return url.rstrip("/")


# --- load shapes and the measurement plan --------------------------------------


@dataclass(frozen=True)
class ClosedLoop:
    """N requests always in flight."""

    concurrency: int

    @property
    def label(self) -> str:
        return f"c={self.concurrency}"


@dataclass(frozen=True)
class OpenLoop:
    """Poisson arrivals at ``rate`` requests/s; at most ``max_in_flight`` outstanding (beyond that: dropped, counted)."""

    rate: float
    max_in_flight: int = 256
    seed: int = 0

    @property
    def label(self) -> str:
        return f"rate={self.rate:g}/s"


@dataclass(frozen=True)
class WindowPlan:
    """How long to warm up, how to cut windows, when to call a point stable, and the hard bounds."""

    warmup_s: float = 3.0
    window_s: float = 5.0
    min_windows: int = 3
    max_windows: int = 10
    tolerance: float = 0.10
    max_requests: int = 20_000
    max_seconds: float = 120.0
    request_timeout_s: float = 30.0
    drain_s: float = 10.0

    def __post_init__(self) -> None:
        if self.min_windows < 1 or self.max_windows < self.min_windows:
            raise ValueError("need 1 <= min_windows <= max_windows")
        if self.window_s <= 0 or self.warmup_s < 0 or self.max_requests < 1 or self.max_seconds <= 0:
            raise ValueError("window_s and max_seconds must be > 0, warmup_s >= 0, max_requests >= 1")


# --- statistics --------------------------------------------------------------


def percentile(values: Sequence[float], q: float) -> float | None:
    """The q-th percentile (0-100) with linear interpolation between ranks (numpy's default); None if empty."""
    if not values:
        return None
    xs = sorted(values)
    pos = (len(xs) - 1) * q / 100.0
    lo, hi = math.floor(pos), math.ceil(pos)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


@dataclass
class Window:
    """One measurement window: requests that *completed* inside it."""

    start: float
    end: float
    ok: int
    errors: dict[str, int]
    latencies_s: list[float] = field(repr=False, default_factory=list)

    @property
    def seconds(self) -> float:
        return max(self.end - self.start, 1e-9)

    @property
    def throughput(self) -> float:
        return self.ok / self.seconds

    @property
    def p99(self) -> float | None:
        return percentile(self.latencies_s, 99)


def is_stable(windows: Sequence[Window], tolerance: float = 0.10, count: int = 3) -> bool:
    """perf_analyzer's rule: the last ``count`` windows each within ``tolerance`` of their mean, for throughput and p99."""
    if len(windows) < count:
        return False
    last = windows[-count:]
    for metric in ([w.throughput for w in last], [w.p99 for w in last]):
        if any(v is None for v in metric):
            return False
        mean = sum(metric) / count
        if mean <= 0 or any(abs(v - mean) / mean > tolerance for v in metric):
            return False
    return True


def diff_stats(before: dict | None, after: dict | None) -> dict | None:
    """What the server did between two ``/stats`` snapshots: batches formed and seconds per stage, per image.

    Returns ``{"images", "batches", "mean_batch_size", "batch_sizes": {size: count},
    "stage_ms_per_image": {stage: ms or None}}``, or None when either side is missing.
    """
    if not before or not after:
        return None
    sizes_before = {int(k): int(v) for k, v in (before.get("batch_sizes") or {}).items()}
    sizes_after = {int(k): int(v) for k, v in (after.get("batch_sizes") or {}).items()}
    sizes = {k: sizes_after.get(k, 0) - sizes_before.get(k, 0) for k in sorted(set(sizes_after) | set(sizes_before))}
    sizes = {k: v for k, v in sizes.items() if v > 0}
    images = sum(k * v for k, v in sizes.items())
    batches = sum(sizes.values())
    stages_before = before.get("stage_seconds") or {}
    stages_after = after.get("stage_seconds") or {}
    per_image: dict[str, float | None] = {}
    for stage in STAGES:
        if stage in stages_after and images:
            per_image[stage] = 1000.0 * (float(stages_after[stage]) - float(stages_before.get(stage, 0.0))) / images
        else:
            per_image[stage] = None
    return {
        "images": images,
        "batches": batches,
        "mean_batch_size": images / batches if batches else None,
        "batch_sizes": sizes,
        "stage_ms_per_image": per_image,
    }


# --- the result of one point ---------------------------------------------------


@dataclass
class PointResult:
    server: str
    load: str  # "closed" or "open"
    concurrency: int | None
    rate: float | None
    stable: bool
    windows_measured: int
    capped: bool  # stopped by max_requests / max_seconds before the windows finished
    seconds: float  # measured wall time (the reported windows)
    ok: int
    errors: dict[str, int]
    dropped: int  # open loop, whole point: arrivals skipped because max_in_flight requests were outstanding
    images_per_s: float
    latency_ms: dict[str, float | None]  # p50, p90, p95, p99, mean, max
    window_throughputs: list[float]
    window_p99_ms: list[float | None]
    client_cpu_pct: float | None  # process CPU time / wall, 100 = one core
    server_cpu_ms_per_image: float | None
    server_stats: dict | None  # diff_stats over the reported windows (batches formed, ms per stage per image)
    requests_sent: int

    def to_dict(self) -> dict:
        return asdict(self)


def _summarise(
    name: str,
    shape: ClosedLoop | OpenLoop,
    windows: list[Window],
    stable: bool,
    capped: bool,
    client_cpu: float | None,
    server_cpu_s: float | None,
    stats: dict | None,
    dropped: int,
    sent: int,
) -> PointResult:
    reported = windows[-3:] if len(windows) >= 3 else windows
    latencies = [x for w in reported for x in w.latencies_s]
    ok = sum(w.ok for w in reported)
    errors: dict[str, int] = {}
    for w in reported:
        for k, v in w.errors.items():
            errors[k] = errors.get(k, 0) + v
    seconds = sum(w.seconds for w in reported)
    lat = {f"p{q}": ms(percentile(latencies, q)) for q in (50, 90, 95, 99)}
    lat["mean"] = ms(sum(latencies) / len(latencies)) if latencies else None
    lat["max"] = ms(max(latencies)) if latencies else None
    images = (stats or {}).get("images") or ok
    result = PointResult(
        server=name,
        load="closed" if isinstance(shape, ClosedLoop) else "open",
        concurrency=shape.concurrency if isinstance(shape, ClosedLoop) else None,
        rate=shape.rate if isinstance(shape, OpenLoop) else None,
        stable=stable,
        windows_measured=len(windows),
        capped=capped,
        seconds=seconds,
        ok=ok,
        errors=errors,
        dropped=dropped,
        images_per_s=ok / seconds if seconds > 0 else 0.0,
        latency_ms=lat,
        window_throughputs=[round(w.throughput, 3) for w in windows],
        window_p99_ms=[ms(w.p99) for w in windows],
        client_cpu_pct=client_cpu,
        server_cpu_ms_per_image=(1000.0 * server_cpu_s / images) if server_cpu_s is not None and images else None,
        server_stats=stats,
        requests_sent=sent,
    )
    return result


def ms(seconds: float | None, digits: int = 3) -> float | None:
    """Seconds as milliseconds, rounded; None stays None."""
    return None if seconds is None else round(1000.0 * seconds, digits)


# --- the measurement ---------------------------------------------------------


class _Recorder:
    """Completed requests, in completion order, plus the counters the bounds need."""

    def __init__(self, max_requests: int):
        self.max_requests = max_requests
        self.sent = 0
        self.done: list[tuple[float, float, Status]] = []  # (end, latency, status)
        self.stop = asyncio.Event()
        self.exhausted = asyncio.Event()  # max_requests sent
        self.dropped = 0
        self.in_flight = 0

    def claim(self) -> int | None:
        """The next request index, or None once stopped or the request budget is spent."""
        if self.stop.is_set() or self.sent >= self.max_requests:
            if self.sent >= self.max_requests:
                self.exhausted.set()
            return None
        i = self.sent
        self.sent += 1
        return i


async def _timed(send: Sender, i: int, started: float, rec: _Recorder, timeout: float) -> None:
    rec.in_flight += 1
    try:
        status = await asyncio.wait_for(send(i), timeout)
    except asyncio.TimeoutError:
        status = "timeout"
    except asyncio.CancelledError:
        rec.in_flight -= 1
        raise
    except Exception as exc:  # the transport's failure is a result, not a crash
        status = f"exc:{type(exc).__name__}"
    end = time.perf_counter()
    rec.in_flight -= 1
    rec.done.append((end, end - started, status))


async def _closed(send: Sender, shape: ClosedLoop, rec: _Recorder, timeout: float) -> None:
    async def worker() -> None:
        while (i := rec.claim()) is not None:
            await _timed(send, i, time.perf_counter(), rec, timeout)

    await asyncio.gather(*(worker() for _ in range(shape.concurrency)))


async def _open(send: Sender, shape: OpenLoop, rec: _Recorder, timeout: float) -> None:
    rng = random.Random(shape.seed)
    tasks: set[asyncio.Task] = set()
    planned = time.perf_counter()
    try:
        while True:
            planned += rng.expovariate(shape.rate)
            # Behind schedule still yields once, so responses get read while arrivals catch up.
            await asyncio.sleep(max(0.0, planned - time.perf_counter()))
            if rec.in_flight >= shape.max_in_flight:
                rec.dropped += 1
                if rec.stop.is_set():
                    break
                continue
            i = rec.claim()
            if i is None:
                break
            # Latency counts from the planned arrival, not from when the loop got round to it.
            task = asyncio.ensure_future(_timed(send, i, planned, rec, timeout))
            tasks.add(task)
            task.add_done_callback(tasks.discard)
        if tasks:
            await asyncio.gather(*tasks, return_exceptions=True)
    finally:
        for task in tasks:
            task.cancel()


async def burst(send: Sender, n: int, timeout_s: float = 60.0) -> list[tuple[Status, float]]:
    """``n`` requests all in flight at once (no windows: each is one result); ``(status, seconds)`` per request, in order.

    Bounded like every other shape: ``n`` requests, each cut at ``timeout_s``.
    """

    async def one(i: int) -> tuple[Status, float]:
        started = time.perf_counter()
        try:
            status = await asyncio.wait_for(send(i), timeout_s)
        except asyncio.TimeoutError:
            status = "timeout"
        except Exception as exc:  # the transport's failure is a result, not a crash
            status = f"exc:{type(exc).__name__}"
        return status, time.perf_counter() - started

    return list(await asyncio.gather(*(one(i) for i in range(n))))


def _window(rec: _Recorder, start: float, end: float, cursor: int) -> tuple[Window, int]:
    """Requests that completed in (start, end]; ``cursor`` is where the previous window stopped reading."""
    ok, errors, lat = 0, {}, []
    n = len(rec.done)
    while cursor < n and rec.done[cursor][0] <= end:
        _, latency, status = rec.done[cursor]
        if status == 200:
            ok += 1
            lat.append(latency)
        else:
            key = str(status)
            errors[key] = errors.get(key, 0) + 1
        cursor += 1
    return Window(start, end, ok, errors, lat), cursor


async def measure(
    name: str,
    send: Sender,
    shape: ClosedLoop | OpenLoop,
    plan: WindowPlan = WindowPlan(),
    *,
    stats: StatsSource | None = None,
    server_cpu: CpuSource | None = None,
    log: Callable[[str], None] | None = None,
) -> PointResult:
    """Run one load point under ``plan`` and summarise its last 3 windows."""
    rec = _Recorder(plan.max_requests)
    began = time.perf_counter()
    deadline = began + plan.max_seconds
    driver = asyncio.ensure_future(
        _closed(send, shape, rec, plan.request_timeout_s) if isinstance(shape, ClosedLoop) else _open(send, shape, rec, plan.request_timeout_s)
    )

    async def pause(seconds: float) -> bool:
        """Sleep ``seconds`` (or to the deadline); False if the load ended early (budget spent, driver failed)."""
        until = min(time.perf_counter() + seconds, deadline)
        while True:
            left = until - time.perf_counter()
            if left <= 0:
                return True
            if driver.done() or rec.exhausted.is_set():
                return False
            await asyncio.sleep(min(left, 0.05))

    windows: list[Window] = []
    capped = False
    try:
        if not await pause(plan.warmup_s):
            capped = True
        cursor = 0
        # Requests that finished during warm-up are excluded.
        mark = time.perf_counter()
        while cursor < len(rec.done) and rec.done[cursor][0] <= mark:
            cursor += 1
        cpu0, server0, stats0 = time.process_time(), server_cpu() if server_cpu else None, await stats() if stats else None
        boundary = [(mark, cpu0, server0, stats0)]
        while not capped and len(windows) < plan.max_windows:
            running = await pause(plan.window_s)
            end = time.perf_counter()
            window, cursor = _window(rec, boundary[-1][0], end, cursor)
            windows.append(window)
            boundary.append((end, time.process_time(), server_cpu() if server_cpu else None, await stats() if stats else None))
            if log:
                log(f"  {name} {shape.label} window {len(windows)}: {window.throughput:.1f} img/s, p99 {ms(window.p99)} ms")
            if not running or time.perf_counter() >= deadline:
                capped = True
                break
            if len(windows) >= plan.min_windows and is_stable(windows, plan.tolerance):
                break
    finally:
        rec.stop.set()
        try:
            await asyncio.wait_for(asyncio.shield(driver), plan.drain_s)
        except (asyncio.TimeoutError, Exception):
            driver.cancel()
            await asyncio.gather(driver, return_exceptions=True)
    if rec.exhausted.is_set():
        capped = True
    if driver.done() and not driver.cancelled() and driver.exception() is not None:
        raise driver.exception()  # type: ignore[misc]
    stable = is_stable(windows, plan.tolerance) if len(windows) >= 3 else False
    first = boundary[-4] if len(boundary) >= 4 else boundary[0]  # the start of the reported (last 3) windows
    last = boundary[-1]
    wall = last[0] - first[0]
    client_cpu = 100.0 * (last[1] - first[1]) / wall if wall > 0 else None
    server_cpu_s = (last[2] - first[2]) if last[2] is not None and first[2] is not None else None
    server_stats = diff_stats(first[3], last[3])
    return _summarise(name, shape, windows, stable, capped, client_cpu, server_cpu_s, server_stats, rec.dropped, rec.sent)


# --- HTTP transport (aiohttp) ----------------------------------------------------


@dataclass(frozen=True)
class HttpRequest:
    """One request body to cycle through: method, path (from the base URL), body, headers.

    ``chunk_size``: send the body with ``Transfer-Encoding: chunked`` in pieces of that
    many bytes (no Content-Length), as a streaming client does; None sends it whole.
    """

    path: str
    body: bytes = b""
    headers: tuple[tuple[str, str], ...] = ()
    method: str = "POST"
    chunk_size: int | None = None


#: ``on_response(i, status, headers, body) -> Status | None``: what ``http_sender`` reports for request ``i`` (None: the status).
ResponseHook = Callable[[int, int, Any, bytes], "Status | None"]


def _chunks(body: bytes, size: int):
    async def gen():
        for start in range(0, len(body), size):
            yield body[start : start + size]

    return gen()


def http_session(limit: int = 256, timeout_s: float = 30.0) -> Any:
    """An aiohttp session for load: keep-alive, no proxies from the environment, bounded connections."""
    import aiohttp

    connector = aiohttp.TCPConnector(limit=limit, limit_per_host=limit, force_close=False, enable_cleanup_closed=True)
    return aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=timeout_s), trust_env=False)


def http_sender(session: Any, base_url: str, requests: Sequence[HttpRequest], on_response: ResponseHook | None = None) -> Sender:
    """``send(i)``: request ``i % len(requests)``; the body is read in full; returns the HTTP status.

    ``on_response`` sees each response (its headers and body) and may return what to report
    instead of the bare status (``None``: the status): the soak tells a 413 ``body_too_large``
    from a 413 of another cause this way; the overload benchmark keeps each Retry-After.
    """
    base = require_loopback(base_url)
    if not requests:
        raise ValueError("need at least one request to send")
    prepared = [(r.method, base + r.path, r.body, dict(r.headers), r.chunk_size) for r in requests]

    async def send(i: int) -> Status:
        method, url, body, headers, chunk_size = prepared[i % len(prepared)]
        data = _chunks(body, chunk_size) if chunk_size else body
        async with session.request(method, url, data=data, headers=headers) as response:
            content = await response.read()
            reported = on_response(i, response.status, response.headers, content) if on_response else None
            return response.status if reported is None else reported

    return send


def http_stats(session: Any, url: str) -> StatsSource:
    """A ``stats`` source that GETs detserve's ``/stats`` (None when it fails)."""
    url = require_loopback(url)

    async def fetch() -> dict | None:
        try:
            async with session.get(url) as response:
                if response.status != 200:
                    return None
                return await response.json()
        except Exception:
            return None

    return fetch


async def measure_http(
    name: str,
    base_url: str,
    requests: Sequence[HttpRequest],
    shapes: Sequence[ClosedLoop | OpenLoop],
    plan: WindowPlan = WindowPlan(),
    *,
    stats_url: str | None = None,
    stats: StatsSource | None = None,
    server_cpu: CpuSource | None = None,
    log: Callable[[str], None] | None = None,
    on_response: ResponseHook | None = None,
) -> list[PointResult]:
    """Measure each load shape in turn against one HTTP server, sharing one keep-alive session."""
    require_loopback(base_url)
    limit = max([s.concurrency if isinstance(s, ClosedLoop) else s.max_in_flight for s in shapes] + [1]) + 2
    async with http_session(limit, plan.request_timeout_s) as session:
        send = http_sender(session, base_url, requests, on_response)
        source = stats or (http_stats(session, stats_url) if stats_url else None)
        results = []
        for shape in shapes:
            results.append(await measure(name, send, shape, plan, stats=source, server_cpu=server_cpu, log=log))
        return results
