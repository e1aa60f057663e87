"""The benchmark harness without Ray: loadgen against a tiny loopback aiohttp server, the window rule, the writers."""

from __future__ import annotations

import asyncio
import json

import numpy as np
import pytest
from aiohttp import web

from detserve.benchmarks import loadgen, report
from detserve.benchmarks.loadgen import ClosedLoop, OpenLoop, Window, WindowPlan, diff_stats, is_stable, percentile, require_loopback
from tests import stand_in

# --- a tiny local server ---------------------------------------------------------------


async def _serve(handler, stats=None):
    return await stand_in.start(("POST", "/predict", handler), *([("GET", "/stats", stats)] if stats is not None else []))


def _fast_plan(**kw) -> WindowPlan:
    defaults = dict(warmup_s=0.2, window_s=0.3, min_windows=3, max_windows=4, tolerance=0.5, max_requests=10_000, max_seconds=5.0, drain_s=2.0)
    return WindowPlan(**{**defaults, **kw})


def test_closed_loop_counts_statuses_and_stays_within_the_request_budget():
    seen = []

    async def handler(request: web.Request):
        body = await request.read()
        seen.append(body)
        return web.Response(status=503 if body == b"bad" else 200, text="{}")

    async def main():
        runner, base = await _serve(handler)
        try:
            requests = [loadgen.HttpRequest("/predict", b"ok"), loadgen.HttpRequest("/predict", b"ok"), loadgen.HttpRequest("/predict", b"bad")]
            plan = _fast_plan(warmup_s=0.0, window_s=10.0, max_requests=60)  # the budget ends the point, not the window
            return await loadgen.measure_http("tiny", base, requests, [ClosedLoop(4)], plan)
        finally:
            await runner.cleanup()

    (point,) = asyncio.run(main())
    assert len(seen) == 60 and point.requests_sent == 60
    assert point.capped  # stopped by max_requests
    assert point.ok + sum(point.errors.values()) == 60
    assert point.errors == {"503": 20} and point.ok == 40
    assert point.concurrency == 4 and point.load == "closed"
    assert point.client_cpu_pct is not None and point.client_cpu_pct >= 0


def test_percentiles_match_the_server_delays():
    delays = [0.01] * 90 + [0.08] * 10  # p50 ~ 10 ms, p99 ~ 80 ms
    counter = iter(range(10**6))

    async def handler(request: web.Request):
        await request.read()
        await asyncio.sleep(delays[next(counter) % len(delays)])
        return web.Response(text="{}")

    async def main():
        runner, base = await _serve(handler)
        try:
            plan = _fast_plan(warmup_s=0.0, window_s=30.0, max_requests=200, max_seconds=30.0)
            return await loadgen.measure_http("tiny", base, [loadgen.HttpRequest("/predict", b"x")], [ClosedLoop(1)], plan)
        finally:
            await runner.cleanup()

    (point,) = asyncio.run(main())
    assert point.ok == 200 and not point.errors
    assert 9 <= point.latency_ms["p50"] < 40
    assert 75 <= point.latency_ms["p99"] < 150
    assert point.latency_ms["p50"] <= point.latency_ms["p90"] <= point.latency_ms["p95"] <= point.latency_ms["p99"] <= point.latency_ms["max"]


def test_windows_stop_when_stable_and_stats_are_diffed():
    state = {"images": 0}

    async def handler(request: web.Request):
        await request.read()
        await asyncio.sleep(0.005)
        state["images"] += 1
        return web.Response(text="{}")

    async def stats(request: web.Request):
        n = state["images"]
        return web.json_response({"batch_sizes": {"1": n}, "stage_seconds": {"engine": 0.005 * n}})

    async def main():
        runner, base = await _serve(handler, stats)
        try:
            plan = _fast_plan(tolerance=0.9, max_windows=8)
            return await loadgen.measure_http("tiny", base, [loadgen.HttpRequest("/predict", b"x")], [ClosedLoop(2)], plan, stats_url=f"{base}/stats")
        finally:
            await runner.cleanup()

    (point,) = asyncio.run(main())
    # Stable after the minimum of 3 windows on a quiet machine; a busy one may need one or two more.
    assert point.stable and 3 <= point.windows_measured < 8 and not point.capped
    s = point.server_stats
    assert s is not None and s["images"] > 0 and set(s["batch_sizes"]) == {1}
    assert s["stage_ms_per_image"]["engine"] == pytest.approx(5.0, rel=1e-6)
    assert s["stage_ms_per_image"]["decode"] is None
    # images counted by the server's /stats and by the client agree within the in-flight requests at the boundaries
    assert abs(s["images"] - point.ok) <= 4


def test_open_loop_sends_at_about_the_rate():
    async def handler(request: web.Request):
        await request.read()
        return web.Response(text="{}")

    async def main():
        runner, base = await _serve(handler)
        try:
            plan = _fast_plan(warmup_s=0.2, window_s=0.5, tolerance=0.5, max_windows=3)
            return await loadgen.measure_http("tiny", base, [loadgen.HttpRequest("/predict", b"x")], [OpenLoop(rate=100.0, seed=1)], plan)
        finally:
            await runner.cleanup()

    (point,) = asyncio.run(main())
    assert point.load == "open" and point.rate == 100.0 and point.concurrency is None
    assert 60 <= point.images_per_s <= 140
    assert not point.errors and point.dropped == 0


def test_a_chunked_body_is_sent_without_content_length_and_the_hook_sees_each_response():
    seen = []

    async def handler(request: web.Request):
        body = await request.read()
        seen.append((request.headers.get("Transfer-Encoding"), request.headers.get("Content-Length"), len(body)))
        return web.json_response({"error": {"code": "too_big"}}, status=413, headers={"X-Seen": str(len(body))})

    hooked = []

    def hook(i, status, headers, body):
        hooked.append((i, status, headers["X-Seen"], json.loads(body)["error"]["code"]))
        return f"{status} {json.loads(body)['error']['code']}"

    async def main():
        runner, base = await _serve(handler)
        try:
            async with loadgen.http_session(2) as session:
                requests = [loadgen.HttpRequest("/predict", b"a" * 10_000, chunk_size=4096), loadgen.HttpRequest("/predict", b"b" * 100)]
                send = loadgen.http_sender(session, base, requests, hook)
                return [await send(0), await send(1)]
        finally:
            await runner.cleanup()

    assert asyncio.run(main()) == ["413 too_big", "413 too_big"]
    assert seen == [("chunked", None, 10_000), (None, "100", 100)]
    assert hooked == [(0, 413, "10000", "too_big"), (1, 413, "100", "too_big")]


def test_transport_failures_are_results_not_crashes():
    async def send(i: int):
        if i % 2:
            raise ConnectionResetError("boom")
        return 200

    point = asyncio.run(loadgen.measure("fake", send, ClosedLoop(2), _fast_plan(warmup_s=0.0, window_s=5.0, max_requests=10)))
    assert point.ok == 5 and point.errors == {"exc:ConnectionResetError": 5}


# --- loopback only -------------------------------------------------------------------


@pytest.mark.parametrize("url", ["http://127.0.0.1:8000", "http://127.0.0.5:1/", "http://[::1]:8000"])
def test_loopback_literals_are_accepted(url):
    assert require_loopback(url) == url.rstrip("/")


@pytest.mark.parametrize(
    "url",
    ["http://10.0.0.1:8000", "http://8.8.8.8", "http://example.com", "http://localhost:8000", "https://127.0.0.1:8000", "http://0.0.0.0:80", "ftp://127.0.0.1"],
)
def test_non_loopback_hosts_are_refused(url):
    with pytest.raises(loadgen.NonLoopbackHost):
        require_loopback(url)


def test_the_http_entry_points_refuse_before_sending():
    with pytest.raises(loadgen.NonLoopbackHost):
        asyncio.run(loadgen.measure_http("x", "http://192.168.1.1:80", [loadgen.HttpRequest("/p")], [ClosedLoop(1)], _fast_plan()))
    with pytest.raises(loadgen.NonLoopbackHost):
        loadgen.http_sender(None, "http://example.org", [loadgen.HttpRequest("/p")])


# --- the window rule and the statistics ------------------------------------------------


def _w(throughput: float, p99_s: float) -> Window:
    n = 100
    lat = [p99_s * 0.5] * (n - 2) + [p99_s] * 2
    return Window(0.0, n / throughput, n, {}, lat)


def test_stability_needs_three_windows_within_tolerance():
    assert not is_stable([_w(100, 0.1), _w(100, 0.1)])
    assert is_stable([_w(100, 0.1), _w(104, 0.1), _w(97, 0.105)], 0.10)
    assert not is_stable([_w(100, 0.1), _w(130, 0.1), _w(100, 0.1)], 0.10)  # throughput drifts
    assert not is_stable([_w(100, 0.1), _w(100, 0.2), _w(100, 0.1)], 0.10)  # p99 jumps
    # only the last three count
    assert is_stable([_w(10, 1.0), _w(100, 0.1), _w(100, 0.1), _w(100, 0.1)], 0.10)
    assert not is_stable([_w(100, 0.1), _w(100, 0.1), Window(0, 1, 0, {}, [])], 0.10)  # an empty window is not stable


def test_percentile_is_numpys_linear_percentile():
    rng = np.random.default_rng(0)
    xs = rng.exponential(size=257).tolist()
    for q in (0, 50, 90, 95, 99, 100):
        assert percentile(xs, q) == pytest.approx(float(np.percentile(xs, q)))
    assert percentile([], 50) is None


def test_diff_stats():
    before = {"batch_sizes": {"1": 3, "4": 1}, "stage_seconds": {"decode": 1.0, "engine": 2.0}}
    after = {"batch_sizes": {"1": 5, "4": 2, "8": 1}, "stage_seconds": {"decode": 1.2, "engine": 2.7, "encode": 0.01}}
    d = diff_stats(before, after)
    assert d["batch_sizes"] == {1: 2, 4: 1, 8: 1}
    assert d["images"] == 14 and d["batches"] == 4 and d["mean_batch_size"] == pytest.approx(3.5)
    assert d["stage_ms_per_image"]["decode"] == pytest.approx(200 / 14)
    assert d["stage_ms_per_image"]["engine"] == pytest.approx(700 / 14)
    assert d["stage_ms_per_image"]["encode"] == pytest.approx(10 / 14)
    assert d["stage_ms_per_image"]["queue_wait"] is None
    assert diff_stats(None, after) is None


def test_plan_bounds_are_checked():
    with pytest.raises(ValueError):
        WindowPlan(max_windows=2, min_windows=3)
    with pytest.raises(ValueError):
        WindowPlan(max_requests=0)


# --- writers --------------------------------------------------------------------------


def _point(server: str, c: int, ips: float, p99: float, sizes=None) -> dict:
    return {
        "server": server, "load": "closed", "concurrency": c, "rate": None, "stable": True, "windows_measured": 3, "capped": False,
        "seconds": 3.0, "ok": int(ips * 3), "errors": {}, "dropped": 0, "images_per_s": ips,
        "latency_ms": {"p50": p99 / 2, "p90": p99 * 0.8, "p95": p99 * 0.9, "p99": p99, "mean": p99 / 2, "max": p99},
        "window_throughputs": [ips] * 3, "window_p99_ms": [p99] * 3, "client_cpu_pct": 3.0, "server_cpu_ms_per_image": 40.0,
        "server_stats": {"images": 30, "batches": 10, "mean_batch_size": 3.0, "batch_sizes": sizes or {"1": 5, "4": 5},
                         "stage_ms_per_image": {"decode": 2.0, "queue_wait": 5.0, "engine": 30.0, "postprocess": 1.0, "encode": 0.1}},
        "requests_sent": 100,
    }  # fmt: skip


def _results() -> dict:
    raw_row = dict(backend="onnxruntime-cpu", threads=1, batch=1, iters=10, ms_per_call_p50=40.0, ms_per_call_p99=50.0, ms_per_image=40.0, cpu_pct=90.0)
    return {
        "profile": "quick",
        "created": "2026-11-21T00:00:00+00:00",
        "machine": {"cpu_count": 2, "cpu_model": "test", "loadavg_start": "1 1 1", "loadavg_end": "1 1 1"},
        "model": {"name": "m", "imgsz": 320, "source": "source.pt"},
        "config": {"p99_budgets_ms": [100.0, 500.0]},
        "raw": [
            {**raw_row, "kind": "infer", "images_per_s": 40.0},
            {**raw_row, "kind": "detect", "images_per_s": 25.0},
            {**raw_row, "kind": "baseline", "backend": "ultralytics-x-torch-eager", "images_per_s": 10.0},
        ],
        "servers": {
            "litserve": {"points": [_point("litserve", 1, 10.0, 90.0), _point("litserve", 8, 15.0, 600.0)]},
            "detserve-http": {"points": [_point("detserve-http", 1, 20.0, 80.0), _point("detserve-http", 8, 30.0, 400.0)]},
        },
        "peers": {"litserve": {"status": "ran", "version": "litserve 0", "config": {"settings": "s"}, "start_s": 1.0},
                  "pytriton": {"status": "unavailable", "reason": "no venv\nsecond line"}},  # fmt: skip
        "errors": {},
    }


def test_markdown_has_the_expected_tables_and_columns():
    md = report.markdown(_results())
    header = "| " + " | ".join(report.POINT_COLUMNS) + " |"
    assert header in md
    assert "| " + " | ".join(report.RAW_COLUMNS) + " |" in md
    assert "| " + " | ".join(report.STAGE_COLUMNS) + " |" in md
    # detserve first, then peers
    assert md.index("| detserve-http | closed c=1 |") < md.index("| litserve | closed c=1 |")
    assert "| detserve-http | closed c=8 | 30.0 |" in md
    assert "1:5 4:5" in md  # the batch-size histogram
    assert "| detserve/raw_detect | 1.20× |" in md  # 30 / 25
    assert "| detserve/baseline | 3.00× |" in md  # 30 / 10
    assert "| detserve/litserve (best images/s) | 2.00× |" in md
    assert "| 100.0 | 20.0 | 10.0 | 2.00× |" in md  # within 100 ms: detserve c=1 vs litserve c=1
    assert "| 500.0 | 30.0 | 10.0 | 3.00× |" in md  # litserve c=8 has p99 600 ms: out of budget
    assert "| pytriton | unavailable |" in md and "no venv second line" in md


def test_json_and_plots_are_written(tmp_path):
    files = report.write_all(_results(), tmp_path)
    data = json.loads((tmp_path / "results.json").read_text())
    assert data["ratios"]["detserve/raw_detect"] == pytest.approx(1.2)
    assert data["budgets"][0]["best"]["detserve-http"] == 20.0
    assert set(data["servers"]) == {"detserve-http", "litserve"}
    for key in ("json", "markdown", "throughput-vs-p99", "batch-sizes"):
        assert files[key].is_file() and files[key].stat().st_size > 0


def test_a_change_in_background_load_is_called_out():
    steady = {**_results(), "calibration_ms": {"raw": 20.0, "detserve": 21.0, "litserve": 20.5, "end": 20.2}}
    md = report.markdown(steady)
    assert "Background load check" in md and "detserve 21.0" in md and "not trustworthy" not in md
    busy = {**_results(), "calibration_ms": {"raw": 20.0, "detserve": 21.0, "litserve": 35.0}}
    assert "not trustworthy" in report.markdown(busy)


def test_photo_payloads_span_vga_to_twelve_megapixels():
    import io

    from PIL import Image

    from detserve.benchmarks.payloads import PHOTO_SIZES, photo_payloads

    sizes = [Image.open(io.BytesIO(p)).size for p in photo_payloads(5)]
    assert sizes == list(PHOTO_SIZES) and Image.open(io.BytesIO(photo_payloads(1)[0])).format == "JPEG"
