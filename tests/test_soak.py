"""The soak's judgement (benchmarks/soak.py), without Ray: labels, outcomes, the pass/fail checks, the
report; the request mix against the replica's real app in process; the open-loop phase against a
stand-in server. ``make soak`` itself runs for minutes and is not part of the suite.
"""

from __future__ import annotations

import asyncio
import collections
import os

import psutil
import pytest
from aiohttp import web

from detserve.benchmarks import soak
from detserve.benchmarks.server import shipped_settings
from detserve.benchmarks.soak import KINDS, SHED, Expect, Sample, evaluate, outcome, response_label
from tests import stand_in

MIB = 2**20


# --- answers ---------------------------------------------------------------------


def test_each_answer_becomes_one_label():
    assert response_label(200, {}, b"{}") == "200"
    assert response_label(413, {}, b'{"error": {"code": "body_too_large", "message": "m"}}') == "413 body_too_large"
    assert response_label(503, {"Retry-After": "2"}, b'{"error": {"code": "overloaded", "message": "m"}}') == SHED
    assert response_label(503, {}, b'{"error": {"code": "overloaded", "message": "m"}}') == "503 overloaded"
    assert response_label(400, {}, b"Invalid HTTP request received.") == "400 (no JSON error body)"
    assert response_label(500, {}, b'{"error": "flat"}') == "500 (no JSON error body)"


def test_only_the_documented_answer_is_expected_and_a_503_with_retry_after_is_shed():
    assert outcome(Expect(200), "200") == "expected"
    assert outcome(Expect(413, "body_too_large"), "413 body_too_large") == "expected"
    assert outcome(Expect(413, "body_too_large"), "413 too_many_images") == "unexpected"
    assert outcome(Expect(400, "not_an_image"), "200") == "unexpected"
    assert outcome(Expect(200), SHED) == "shed"
    assert outcome(Expect(200), "503 overloaded") == "unexpected"  # no Retry-After: not the documented shed
    assert outcome(Expect(200), "exc:ServerDisconnectedError") == "unexpected"
    assert outcome(Expect(200), soak.NO_ANSWER) == "unexpected"


# --- the verdict -------------------------------------------------------------------


def _good_tally() -> soak.Tally:
    return {k.name: collections.Counter({k.expect.label: 10}) for k in KINDS}


def _samples(rss_mib: list[float], fds: int = 60, pid: int = 7, proxy_pid: int = 8) -> list[Sample]:
    return [Sample(10.0 * i, pid, int(r * MIB), fds, proxy_pid, 200 * MIB, 70) for i, r in enumerate(rss_mib)]


def _rest(replica_fds=60, proxy_fds=40) -> Sample:
    return Sample(0.0, 7, 1300 * MIB, replica_fds, 8, 200 * MIB, proxy_fds)


def _checks(tally=None, samples=None, before=None, after=None, **kw) -> dict[str, soak.Check]:
    args = dict(baseline_at_s=60.0, windows_planned=60, windows_measured=60, dropped=0)
    args.update(kw)
    checks = evaluate(_good_tally() if tally is None else tally, samples or _samples([1250] * 6 + [1300] * 55),
                      before or _rest(), after or _rest(), **args)  # fmt: skip
    return {c.name: c for c in checks}


def test_a_clean_run_passes_every_check():
    checks = _checks()
    assert all(c.passed for c in checks.values()), [c for c in checks.values() if not c.passed]
    assert "1300 MiB at t=60 s -> 1300 MiB at t=600 s (+0.0%)" in checks["replica RSS within 10% of its baseline"].detail


def test_one_unexpected_answer_fails_and_is_named_with_its_kind():
    tally = _good_tally()
    tally["oversized_chunked"]["exc:ClientOSError"] += 1
    tally["jpeg_small"][SHED] += 3  # shed load is reported, not failed
    check = _checks(tally)["no unexpected answers"]
    assert not check.passed
    assert check.detail == "oversized_chunked (expected 413 body_too_large): exc:ClientOSError x1"


def test_a_kind_never_sent_fails():
    tally = _good_tally()
    del tally["png_large"]
    check = _checks(tally)["every kind of request was sent"]
    assert not check.passed and "png_large" in check.detail


def test_rss_is_judged_from_the_first_sample_after_the_warm_up_to_the_last():
    # Growth during the warm-up does not count; 9 % after it passes, 11 % fails, so does an 11 % drop.
    grow = lambda end: _samples([900] * 6 + [1000] * 50 + [end] * 5)  # noqa: E731
    assert _checks(samples=grow(1090))["replica RSS within 10% of its baseline"].passed
    failed = _checks(samples=grow(1110))["replica RSS within 10% of its baseline"]
    assert not failed.passed and "(+11.0%)" in failed.detail and "at t=60 s" in failed.detail
    assert not _checks(samples=grow(885))["replica RSS within 10% of its baseline"].passed
    assert soak.baseline_sample(grow(1000), 60.0).t_s == 60.0
    assert soak.baseline_sample(grow(1000), 55.0).t_s == 60.0


def test_missing_rss_readings_fail_rather_than_pass():
    samples = [Sample(10.0 * i, 7, None, 60, 8, 1, 70) for i in range(61)]
    assert not _checks(samples=samples)["replica RSS within 10% of its baseline"].passed


def test_fds_may_grow_by_the_slack_and_no_more():
    assert _checks(after=_rest(replica_fds=60 + soak.FD_SLACK))["replica open fds not growing (<= +8)"].passed
    check = _checks(after=_rest(proxy_fds=40 + soak.FD_SLACK + 1))["proxy open fds not growing (<= +8)"]
    assert not check.passed and check.detail == "40 -> 49 at rest"
    assert not _checks(after=Sample(0.0, 7, 1, None, 8, 1, None))["replica open fds not growing (<= +8)"].passed


def test_a_restarted_replica_a_short_run_and_dropped_arrivals_fail():
    samples = _samples([1300] * 30) + _samples([1300] * 31, pid=99)
    checks = _checks(samples=samples)
    assert not checks["the same replica process throughout"].passed and "7, 99" in checks["the same replica process throughout"].detail
    assert checks["the same proxy process throughout"].passed
    assert not _checks(windows_measured=59)["the load ran its full length"].passed
    assert not _checks(dropped=3)["every arrival was sent"].passed


def test_slope_per_minute():
    assert soak.slope_per_minute([(0, 100.0), (60, 110.0), (120, 120.0)]) == pytest.approx(10.0)
    assert soak.slope_per_minute([(0, 1.0), (10, 1.0)]) is None


# --- the mix, against the replica's real app ---------------------------------------------


def test_the_mix_holds_every_kind_in_its_weight_with_bodies_past_the_limits():
    kinds, requests = soak.build_mix(64 * 1024, 4, "/x/predict")
    assert collections.Counter(kinds) == {k.name: k.weight for k in KINDS}
    assert len(set(kinds[:20])) > 5  # shuffled, not in blocks
    by_kind = {k: r for k, r in zip(kinds, requests)}
    assert len(by_kind["oversized_body"].body) > 64 * 1024 and by_kind["oversized_body"].chunk_size is None
    assert len(by_kind["oversized_chunked"].body) > 64 * 1024 and by_kind["oversized_chunked"].chunk_size
    assert by_kind["too_many_images"].body.count(b"Content-Disposition") == 5


def test_every_kind_of_the_mix_gets_its_expected_answer_from_the_app(local_client, monkeypatch):
    """The expectations are the app's documented answers: each kind sent once through the real app.

    An 8 MiB limit (the large PNG is about 3 MB) and 4 images, so the oversized bodies stay small here.
    """
    from detserve.runtime.images import Limits
    from detserve.serve.http import RequestLimits

    server = local_client.server
    monkeypatch.setattr(server, "request_limits", RequestLimits(8 * MIB, 4))
    monkeypatch.setattr(server, "limits", Limits(max_pixels=server.limits.max_pixels, max_bytes=8 * MIB))
    kinds, requests = soak.build_mix(8 * MIB, 4, "/predict")
    first = {}
    for kind, request in zip(kinds, requests):
        first.setdefault(kind, request)
    for kind, request in first.items():
        body = request.body
        if request.chunk_size:  # chunked, as the load generator sends it
            body = (request.body[i : i + request.chunk_size] for i in range(0, len(request.body), request.chunk_size))
        r = local_client.post(request.path, content=body, headers=dict(request.headers))
        assert response_label(r.status_code, r.headers, r.content) == soak.KIND_BY_NAME[kind].expect.label, (kind, r.text[:200])


# --- the open-loop phase against a stand-in --------------------------------------------


def test_the_load_phase_counts_every_answer_by_kind_and_samples_each_window():
    """A stand-in that answers 200 to everything: every bad kind is then unexpected, by name."""
    me = psutil.Process()

    async def predict(request: web.Request):
        await request.read()
        return web.json_response({"results": []})

    async def stats(request: web.Request):
        return web.json_response({"pid": me.pid, "rss_bytes": me.memory_info().rss, "open_fds": me.num_fds()})

    kinds, requests = soak.build_mix(32 * 1024, 4, "/soak/predict")
    tally: soak.Tally = {}

    async def main():
        runner, base = await stand_in.start(("POST", "/soak/predict", predict), ("GET", "/soak/stats", stats), client_max_size=10 * MIB)
        try:
            sampler = soak.Sampler(f"{base}/soak/stats", os.getpid())
            before = await sampler.at_rest(settle_s=0.1)
            point, planned = await soak.soak_load(base, kinds, requests, rate=150.0, seconds=1.5, sample_s=0.5, sampler=sampler,
                                                  tally=tally, request_timeout_s=5.0, echo=None)  # fmt: skip
            after = await sampler.at_rest(settle_s=0.1)
            return sampler, before, point, planned, after
        finally:
            await runner.cleanup()

    sampler, before, point, planned, after = asyncio.run(main())
    assert planned == 3 and point.windows_measured == 3
    assert len(sampler.samples) == 4 and [round(s.t_s) for s in sampler.samples][-1] in (1, 2)
    assert sum(sum(c.values()) for c in tally.values()) == point.requests_sent > 100
    assert all(set(c) == {"200"} for c in tally.values())
    result = soak.assemble(tally, sampler.samples, before, after, point, planned, capacity=(200.0, 300.0, "c=8"), fraction=0.75,
                           rate=150.0, seconds=1.5, sample_s=0.5, baseline_at_s=0.5)  # fmt: skip
    checks = {c["name"]: c for c in result["checks"]}
    assert not result["passed"] and not checks["no unexpected answers"]["passed"]
    assert "not_an_image (expected 400 not_an_image): 200 x" in checks["no unexpected answers"]["detail"]
    assert checks["the same replica process throughout"]["passed"] and checks["the load ran its full length"]["passed"]
    rows = {r["kind"]: r for r in result["kinds"]}
    assert rows["jpeg_small"]["unexpected"] == 0 and rows["jpeg_small"]["expected_n"] == rows["jpeg_small"]["sent"] > 0

    result.update(created="2026-12-02T00:00:00", machine={"cpu_count": 2, "cpu_model": "x"}, server={"settings": "stand-in"})
    md = soak.markdown(result)
    assert md.startswith("# detserve soak: FAIL")
    assert "| no unexpected answers | **FAIL** |" in md
    assert "| jpeg_small | one JPEG, 200-480 px | 200 |" in md
    assert "| open fds at rest, before -> after |" in md
    assert soak.summary_lines(result)[0].startswith("soak FAILED:")


def test_the_shipped_settings_are_deploy_yamls_yolo_app_on_one_replica():
    settings = shipped_settings(model="/m")
    assert settings.args["model"] == "/m" and settings.args["max_body_bytes"] == 52428800 and settings.args["max_images"] == 64
    assert settings.options["num_replicas"] == 1 and settings.options["autoscaling_config"] is None
    assert settings.options["max_queued_requests"] == 256 and settings.options["ray_actor_options"]["num_cpus"] == 0.5
    assert settings.request_timeout_s == 30 and settings.logging_config["enable_access_log"] is False


def test_stats_report_the_replicas_pid_rss_and_open_fds(local_client):
    before = local_client.get("/stats").json()
    assert before["pid"] == os.getpid() and before["rss_bytes"] > 0
    files = [open(os.devnull) for _ in range(5)]  # noqa: SIM115
    try:
        during = local_client.get("/stats").json()["open_fds"]
    finally:
        for f in files:
            f.close()
    assert during >= before["open_fds"] + 5
    assert local_client.get("/stats").json()["open_fds"] <= during - 5
