"""The overload benchmark without Ray: its burst shape against a tiny loopback server, its summaries and its report."""

from __future__ import annotations

import asyncio
import base64
import json

import pytest
from aiohttp import web

from detserve.benchmarks import loadgen, overload, peers
from detserve.benchmarks.overload import Reply
from tests import stand_in


async def _serve(handler):
    # /predict, and the benchmark's own route
    return await stand_in.start(("POST", "/predict", handler), ("POST", f"/{overload.APP}/predict", handler), client_max_size=64 * 1024 * 1024)


# --- the burst shape and the response hook --------------------------------------------------


def test_a_burst_has_every_request_in_flight_at_once_and_keeps_each_retry_after():
    in_flight, most = 0, 0
    release = asyncio.Event()

    async def handler(request: web.Request):
        nonlocal in_flight, most
        await request.read()
        in_flight += 1
        most = max(most, in_flight)
        if in_flight == 40:
            release.set()  # only the 40th arrival lets them all answer: a burst that trickled would time out
        await asyncio.wait_for(release.wait(), 5)
        in_flight -= 1
        i = int(request.headers["x-i"])
        if i % 4 == 0:
            body = {"error": {"code": "overloaded", "message": "the server is busy: 9 images queued"}}
            return web.json_response(body, status=503, headers={"Retry-After": str(1 + i % 3), "x-detserve-refused-by": "replica"})
        return web.json_response({"results": []})

    seen = {}

    async def main():
        runner, base = await _serve(handler)
        try:
            requests = [loadgen.HttpRequest("/predict", b"x", (("x-i", str(i)),)) for i in range(40)]
            async with loadgen.http_session(50, 10) as session:
                send = loadgen.http_sender(session, base, requests, on_response=lambda i, s, h, b: seen.__setitem__(i, overload.classify(s, h, b)))
                return await loadgen.burst(send, 40, timeout_s=10)
        finally:
            await runner.cleanup()

    results = asyncio.run(main())
    assert most == 40 and len(results) == 40
    assert [status for status, _ in results] == [503 if i % 4 == 0 else 200 for i in range(40)]
    assert all(0 < seconds < 10 for _, seconds in results)
    assert seen[0] == ("1", "overloaded", "replica") and seen[4] == ("2", "overloaded", "replica")
    assert seen[1] == (None, None, None)


def test_a_burst_counts_timeouts_and_transport_failures_as_results():
    async def send(i: int):
        if i == 0:
            await asyncio.sleep(5)
        if i == 1:
            raise ConnectionResetError("gone")
        return 200

    results = asyncio.run(loadgen.burst(send, 3, timeout_s=0.2))
    assert [s for s, _ in results] == ["timeout", "exc:ConnectionResetError", 200]


def test_classify_tells_who_shed_a_request():
    from detserve.serve.proxy_admission import refusal_messages

    ray_queue = json.dumps({"error": {"code": "overloaded", "message": "the server's queue is full: retry after 1 second(s)"}}).encode()
    assert overload.classify(503, {"Retry-After": "1"}, ray_queue) == ("1", "overloaded", "ray-queue")
    replica = json.dumps({"error": {"code": "overloaded", "message": "the server is busy: the 9 images queued ahead ..."}}).encode()
    assert overload.classify(503, {"Retry-After": "2", "x-detserve-refused-by": "replica"}, replica) == ("2", "overloaded", "replica")
    body = refusal_messages("3")[1]["body"]
    assert overload.classify(503, {"Retry-After": "3", "x-detserve-refused-by": "proxy"}, body) == ("3", "overloaded", "proxy")
    haproxy = {"Retry-After": "3", "x-detserve-refused-by": "haproxy"}  # serve/haproxy_admission.lua's refusals
    assert overload.classify(503, haproxy, body) == ("3", "overloaded", "haproxy")
    assert overload.classify(408, {}, json.dumps({"error": {"code": "deadline_exceeded", "message": "x"}}).encode()) == (None, "deadline_exceeded", None)
    assert overload.classify(503, {}, b"Service Unavailable") == (None, "not-json", None)


# --- payloads ---------------------------------------------------------------------------------------


def test_the_large_requests_carry_every_image_as_json_and_as_multipart():
    images = [bytes([i]) * (100 + i) for i in range(5)]
    json_request, multipart = overload.large_requests(images)
    assert [base64.b64decode(x) for x in json.loads(json_request.body)["images"]] == images
    parts = []

    async def handler(request: web.Request):
        reader = await request.multipart()
        while (part := await reader.next()) is not None:
            parts.append(await part.read())
        return web.json_response({})

    async def main():
        runner, base = await _serve(handler)
        try:
            async with loadgen.http_session(2, 10) as session:
                return await loadgen.http_sender(session, base, [multipart])(0)
        finally:
            await runner.cleanup()

    assert asyncio.run(main()) == 200
    assert parts == images
    one, _ = peers.multipart_request(images[0])  # the single-file form the peers get is unchanged
    assert one.count(b"filename=") == 1 and one.endswith(b"--detservebenchboundary--\r\n")


def test_the_benchmark_serves_deploy_yamls_yolo_application_with_one_fixed_replica(tmp_path):
    args, options = overload.shipped_yolo(tmp_path)
    assert args["model"] == str(tmp_path) and args["request_timeout_s"] == 30
    assert options["num_replicas"] == 1 and options["autoscaling_config"] is None
    assert options["max_ongoing_requests"] == 2048 and options["ray_actor_options"]["num_cpus"] == 0.5
    assert options["user_config"]["max_batch_size"] == 8


# --- summaries ----------------------------------------------------------------------------


def test_burst_summary_counts_statuses_and_judges_the_503s():
    replies = [Reply(200, 2.0 + i / 100) for i in range(60)] + [Reply(503, 0.05, "3", "overloaded", "replica")] * 30
    replies += [Reply(503, 0.08, "12", "overloaded", "replica"), Reply(503, 0.1, None, "overloaded", "ray-queue"), Reply(408, 29.5, None, "deadline_exceeded")]
    replies += [Reply("timeout", 60.0)]
    s = overload.burst_summary(replies)
    assert s["requests"] == 94 and s["statuses"] == {"200": 60, "408": 1, "503": 32, "timeout": 1}
    assert s["unanswered"] == 1 and s["answered_200_share"] == pytest.approx(60 / 94)
    assert s["retry_after_s"] == {"3": 30, "12": 1, "none": 1} and list(s["retry_after_s"]) == ["3", "12", "none"]
    assert s["retry_after_missing"] == 1
    assert s["shed_by"] == {"replica": 31, "ray-queue": 1}
    assert s["ms_503"]["max"] == 100.0 and s["immediate_503"] is True
    assert s["codes"]["408 deadline_exceeded"] == 1
    # A 503 slower than the median 200 was queued before it was refused: not immediate.
    slow = overload.burst_summary([Reply(200, 0.5), Reply(200, 0.6), Reply(503, 0.9, "1")])
    assert slow["immediate_503"] is False
    assert overload.burst_summary([Reply(200, 1.0)])["immediate_503"] is None


def test_a_503_is_immediate_only_when_the_slowest_came_before_the_median_200_and_within_a_second():
    assert overload.shed_latency([0.01, 0.02, 0.2], 0.5) == {"p50": 20.0, "p99": pytest.approx(196.4), "max": 200.0, "immediate": True}
    assert overload.shed_latency([0.01, 0.6], 0.5)["immediate"] is False  # one waited behind the queue
    assert overload.shed_latency([0.01, 1.2], None)["immediate"] is False  # over a second
    assert overload.shed_latency([], 0.5)["immediate"] is None


def _open_point(**kw) -> dict:
    point = {"rate": 200.0, "seconds": 10.0, "ok": 900, "images_per_s": 90.0, "errors": {"503": 950, "408": 10},
             "dropped": 0, "latency_ms": {"p50": 400.0, "p99": 1500.0}}  # fmt: skip
    return {**point, **kw}


def test_open_loop_summary_divides_goodput_by_the_peak_and_p99_by_the_deadline():
    s = overload.open_loop_summary(_open_point(), 100.0, 2.0)
    assert s["offered_x_peak"] == pytest.approx(2.0) and s["goodput_x_peak"] == pytest.approx(0.9)
    assert s["p99_x_deadline"] == pytest.approx(0.75) and s["meets_goodput_target"] and s["meets_p99_target"]
    assert s["answered"] == 1860 and s["shed_share"] == pytest.approx(950 / 1860) and s["late"] == 10
    collapsed = overload.open_loop_summary(_open_point(ok=20, images_per_s=2.0, errors={"503": 300, "408": 900, "exc:X": 2}, latency_ms={"p99": 2100.0}), 100.0, 2.0)
    assert collapsed["meets_goodput_target"] is False and collapsed["meets_p99_target"] is False
    assert collapsed["late"] == 900 and collapsed["other_errors"] == {"exc:X": 2}


def test_batch_seconds_reads_the_replicas_cost_curve_at_its_chosen_size():
    stats = {"scheduler": {"target_batch_size": 2, "ms_per_image_by_batch": {"1": 22.0, "2": 20.0, "4": 27.0}}}
    assert overload.batch_seconds(stats) == pytest.approx(0.040)
    stats["scheduler"]["target_batch_size"] = 3  # not measured: the nearest measured size's cost per image
    assert overload.batch_seconds(stats) == pytest.approx(3 * 0.020)
    assert overload.batch_seconds(None) is None and overload.batch_seconds({"scheduler": {}}) is None


def test_mixed_summary_measures_the_small_requests_extra_latency_in_batch_times():
    idle = {"latency_ms": {"p50": 30.0, "p99": 40.0}, "errors": {}}
    large = {"ok": 2, "errors": {}, "requests_sent": 3, "latency_ms": {"p50": 4000.0}}
    during = {"latency_ms": {"p50": 45.0, "p99": 80.0}, "errors": {}, "server_stats": {"stage_ms_per_image": {"engine": 21.0}}}
    fair = overload.mixed_summary({**idle, "server_stats": {"stage_ms_per_image": {"engine": 14.0}}}, during, large, 0.025)
    assert fair["engine_ms_per_image"] == {"idle": 14.0, "during": 21.0}
    assert fair["p99_ratio"] == pytest.approx(2.0) and fair["p99_extra_batches"] == pytest.approx(1.6)
    assert fair["p50_extra_batches"] == pytest.approx(0.6) and fair["meets_fairness_target"] is True
    assert fair["large"] == {"answered_200": 2, "errors": {}, "sent": 3, "p50_s": 4.0}
    unfair = overload.mixed_summary(idle, {"latency_ms": {"p50": 50.0, "p99": 100.0}, "errors": {"503": 1}}, large, 0.025)
    assert unfair["p99_extra_batches"] == pytest.approx(2.4) and unfair["meets_fairness_target"] is False
    assert unfair["small_errors"] == {"during 503": 1}
    assert overload.mixed_summary(idle, idle, large, None)["meets_fairness_target"] is None


def test_count_diff_is_what_admission_did_in_between():
    before = {"scheduler": {"counts": {"admitted": 10, "shed": 2}}}
    after = {"scheduler": {"counts": {"admitted": 25, "shed": 2, "deadline": 1}}}
    assert overload.count_diff(before, after) == {"admitted": 15, "deadline": 1}
    assert overload.count_diff(None, after) == {"admitted": 25, "deadline": 1, "shed": 2}


def test_the_report_puts_each_measure_beside_its_target():
    results = {
        "created": "2026-12-02T00:00:00+00:00", "machine": {"cpu_count": 2}, "model": {"name": "m", "imgsz": 320},
        "config": {"peak_concurrency": [8, 16], "settings": "s", "large_images": 64, "large_side": 3000, "large_body_bytes": {"json": 2**20, "multipart": 2**20}},
        "peak_images_per_s": 50.0,
        "peak": [{"concurrency": 8, "images_per_s": 50.0, "latency_ms": {"p99": 170.0}, "errors": {}, "stable": True}],
        "burst": {"summary": overload.burst_summary([Reply(200, 3.0)] * 290 + [Reply(503, 0.05, "2", "overloaded", "replica")] * 10)},
        "open_loops": [{"summary": {**overload.open_loop_summary(_open_point(), 100.0, 30.0), "deadline_from": "server", "shed_by": {"proxy": 950},
                                    "ms_503": overload.shed_latency([0.01, 0.02, 0.03], 0.4),
                                    "ms_503_by": {"proxy": overload._spread([0.01]), "replica": overload._spread([0.02, 0.03])}}},
                       {"summary": {**overload.open_loop_summary(_open_point(ok=20, images_per_s=2.0), 100.0, 2.0), "deadline_from": "client"}}],
        "mixed": {"summary": overload.mixed_summary({"latency_ms": {"p50": 30.0, "p99": 40.0}}, {"latency_ms": {"p50": 45.0, "p99": 80.0}}, {}, 0.025)},
        "admission": {"burst": {"admitted": 290, "shed": 10}},
        "errors": {},
    }  # fmt: skip
    md = overload.markdown(results)
    assert "| peak (closed loop, best of c=8/16) | 50.0 images/s |" in md
    assert "| burst of 300 at once: answered 200 | 290 (97 %); 503: 10 | every one answered | yes |" in md
    assert "immediate (≤ 1 s, before the median 200) | yes |" in md
    assert "| burst: Retry-After (s: count) | 2: 10 | computed, on every 503 | yes |" in md
    assert "| open loop at 2.0× peak, server deadline 30.0 s, 10.0 s measured: goodput / peak | 0.90× (90.0 images/s) | ≥ 0.9× | yes |" in md
    assert "server deadline 30.0 s: shed (503) / late (408, timeout) | 51 % (by proxy: 950) / 10 |" in md
    assert "| open loop at 2.0× peak, client deadline 2.0 s, 10.0 s measured: goodput / peak | 0.02× (2.0 images/s) | ≥ 0.9× | **no** |" in md
    assert "client deadline 2.0 s: p99 of the 200s / deadline | 0.75× (p99 1500.0 ms) | < 1× | yes |" in md
    assert "+1.6 batch times of 25.0 ms) | ≤ idle + 2 batch times | yes |" in md
    assert "server deadline 30.0 s: 503 latency p50 / p99 / max | 20.0 / 29.8 / 30.0 ms; proxy 10.0 / 10.0 / 10.0; replica 25.0 / 29.9 / 30.0 | immediate (≤ 1 s, before the median 200) | yes |" in md
    assert "burst: admitted: 290, shed: 10" in md
    assert "Background load check" not in md
    steady = overload.markdown({**results, "calibration_ms": {"peak": 20.0, "mixed": 21.0, "end": 20.5}})
    assert "peak 20.0, mixed 21.0, end 20.5 (spread 5 %)" in steady and "not trustworthy" not in steady
    assert "not trustworthy" in overload.markdown({**results, "calibration_ms": {"peak": 20.0, "mixed": 30.0}})
    # A run that failed early still reports, with the error and dashes for what it never measured.
    md = overload.markdown({"errors": {"run": "RuntimeError: no Ray\nmore"}, "config": {}})
    assert "- run: RuntimeError: no Ray" in md and "| — images/s |" in md
