"""Admission's one rule (serve/admission.py, serve/scheduler.py) and the ingress that only compares
(serve/proxy_admission.py; HAProxy's Lua runs live in tests/test_ingress.py)."""

from __future__ import annotations

import asyncio
import json
import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from detserve.serve.admission import ANSWER_BEFORE_TIMEOUT_S, FRESH_S, Outlook, RequestCost, request_budget_s
from detserve.serve.protocol import REFUSED_AT_INGRESS
from detserve.serve.proxy_admission import ProxyAdmission, render_lua
from detserve.serve.scheduler import CostCurve, Overloaded, Scheduler, Settings


class Clock:
    def __init__(self, now: float = 1000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def scheduler(rate: float = 10.0, headroom: float = 0.8, clock: Clock | None = None, **kw) -> Scheduler:
    return Scheduler(lambda items, params: items, Settings(max_batch_size=1, headroom=headroom, **kw),
                     curve=CostCurve({1: 1 / rate}), clock=clock or Clock())  # fmt: skip


def test_the_outlook_round_trips_and_junk_is_ignored():
    o = Outlook("replica-x7", 1765000000.125, 1765000004.5, 0.7, 2.0, 30.0)
    assert Outlook.parse(o.header().encode()) == o and Outlook.parse(o.header()) == o
    assert Outlook.parse(Outlook("a", 1.0, 2.0, 0.5, 1.0).header()).max_timeout_s == 1e9  # no limit: a number Lua reads
    for junk in (None, "", "replica=a", "replica=a;open_at=x;need_until=1;least_timeout=1;spread=1",
                 "replica=a;open_at=nan;need_until=1;least_timeout=1;spread=1",
                 "replica=a;open_at=1;need_until=1;least_timeout=1;spread=-1"):  # fmt: skip
        assert Outlook.parse(junk) is None


def test_an_outlook_refuses_before_open_at_and_too_short_timeouts_unless_hopeless():
    o = Outlook("a", open_at=100.0, need_until=110.0, least_timeout_s=1.0, spread_s=4.0)
    assert o.refuses(99.9) and not o.refuses(100.0)
    assert o.refuses(101.0, client_timeout_s=5.0) and not o.refuses(101.0, client_timeout_s=9.0)
    assert not o.refuses(99.0, client_timeout_s=0.5)  # even an idle replica would refuse it: it goes on, for its 422
    capped = Outlook("a", open_at=100.0, need_until=110.0, least_timeout_s=1.0, spread_s=4.0, max_timeout_s=30.0)
    assert capped.refuses(99.0, client_timeout_s=29.0) and not capped.refuses(99.0, client_timeout_s=31.0)  # the app's 422
    assert o.retry_after_s(98.0, u=0.0) == 2.0 and o.retry_after_s(98.0, u=1.0) == 6.0 and o.retry_after_s(101.0, u=0.5) == 2.0


@settings(max_examples=200, deadline=None)
@given(
    queued=st.lists(st.tuples(st.integers(1, 8), st.floats(0.5, 40.0)), max_size=30),
    rate=st.floats(2.0, 80.0),
    headroom=st.sampled_from([0.6, 0.8, 1.0]),
    client=st.one_of(st.none(), st.floats(0.05, 60.0)),
    measured=st.one_of(st.none(), st.floats(1.0, 80.0)),
)
def test_the_outlook_refuses_exactly_what_admit_refuses_for_one_image(queued, rate, headroom, client, measured):
    """At the moment it is sent, the outlook and the replica's own admit give the same verdict on one image,
    whatever the queue, its deadlines, the measured throughput and the client's timeout: the ingress compares, the rule is one."""
    server_timeout = 30.0
    clock = Clock()
    sched = scheduler(rate, headroom, clock=clock)
    if measured is not None:
        sched.drain_rate = lambda: measured
    for images, timeout in queued:
        try:
            sched.admit(images, clock.now + request_budget_s(server_timeout, timeout))
        except Overloaded:
            pass
    outlook = sched.outlook("r", request_budget_s(server_timeout, None))
    budget = request_budget_s(server_timeout, client)
    try:
        ticket = sched.admit(1, clock.now + budget)
        replica = "admitted"
        sched.release(ticket)
    except Overloaded as exc:
        replica = "hopeless" if exc.hopeless else "refused"
    ingress = outlook.refuses(clock.now, client)
    if replica == "hopeless":
        assert not ingress  # it goes on to the replica, for its 422
    else:
        assert ingress == (replica == "refused"), (replica, outlook, sched.outstanding)


def test_a_refusal_before_open_at_is_spread_and_never_before_it():
    clock = Clock()
    sched = scheduler(10.0, clock=clock)
    while True:
        try:
            sched.admit(1, clock.now + request_budget_s(2.5, None))
        except Overloaded:
            break
    o = sched.outlook("r", request_budget_s(30.0, None))
    waits = sorted(o.retry_after_s(clock.now) for _ in range(200))
    assert waits[0] >= o.open_at - clock.now - 1e-9 and waits[-1] - waits[0] > 0.5 * o.spread_s  # spread, not one value


def test_pixels_make_a_request_hopeless_at_once():
    """64 photos whose decode alone (one after another) outlasts the deadline: refused at admission, not after the work."""
    sched = scheduler(100.0)
    big = RequestCost(64, decode_s=64 * 0.45, pixels=64 * 36_000_000)
    with pytest.raises(Overloaded) as err:
        sched.admit(big, sched.clock() + request_budget_s(30.0, None))
    assert err.value.hopeless and "2304 megapixels" in err.value.reason and sched.outstanding == 0
    eight = RequestCost(8, decode_s=8 * 0.45, pixels=8 * 36_000_000)
    assert sched.admit(eight, sched.clock() + request_budget_s(30.0, None)).n == 8  # 3.6 s of decode fits


def test_a_requests_own_decode_counts_even_behind_an_empty_queue():
    sched = scheduler(100.0, headroom=1.0)
    assert sched.predicted_drain_s(RequestCost(2, decode_s=1.5)) == pytest.approx(1.5 + 0.01)
    assert sched.predicted_drain_s(RequestCost(0)) == 0.0
    assert sched.predicted_drain_s(RequestCost(200, decode_s=0.5)) == pytest.approx(2.0)


def _asgi(headers: list[tuple[bytes, bytes]], calls: list):
    async def app(scope, receive, send):
        calls.append(scope["path"])
        await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"application/json"), *headers]})
        await send({"type": "http.response.body", "body": b"{}"})

    return app


def _call(middleware, path: str = "/yolo/predict", method: str = "POST", headers: tuple = ()):
    sent: list[dict] = []

    async def receive():
        raise AssertionError("the body is not read")

    async def send(message):
        sent.append(message)

    asyncio.run(middleware({"type": "http", "method": method, "path": path, "headers": list(headers)}, receive, send))
    return sent


def test_the_python_proxy_learns_from_answers_strips_the_header_and_refuses_without_the_replica():
    calls: list = []
    wall, mono = Clock(5000.0), Clock(10.0)
    full = Outlook("a", open_at=5003.0, need_until=5010.0, least_timeout_s=0.2, spread_s=1.0)
    middleware = ProxyAdmission(_asgi([(b"x-detserve-admit", full.header().encode())], calls), haproxy=False, clock=mono, wall=wall)
    first = _call(middleware)  # nothing heard yet: through to the replica
    assert first[0]["status"] == 200 and all(k != b"x-detserve-admit" for k, _ in first[0]["headers"])
    refused = _call(middleware)
    assert len(calls) == 1 and refused[0]["status"] == 503
    headers = dict(refused[0]["headers"])
    assert headers[b"x-detserve-refused-by"] == b"proxy" and 3 <= int(headers[b"retry-after"]) <= 4
    error = json.loads(refused[1]["body"])["error"]
    assert error["code"] == "overloaded" and REFUSED_AT_INGRESS in error["message"] and headers[b"retry-after"].decode() in error["message"]
    # a short client timeout is refused past open_at too, until need_until; a hopeless one goes on for its 422
    wall.now = 5003.5
    assert _call(middleware, headers=((b"x-request-timeout-seconds", b"2"),))[0]["status"] == 503
    assert _call(middleware, headers=((b"x-request-timeout-seconds", b"0.1"),))[0]["status"] == 200
    assert _call(middleware)[0]["status"] == 200
    # other routes and methods pass untouched; an outlook older than FRESH_S no longer refuses
    _call(middleware, "/yolo/stats", "GET")
    wall.now, mono.now = 5000.0, mono.now + FRESH_S + 1
    assert _call(middleware)[0]["status"] == 200


def test_the_proxy_refuses_only_when_every_fresh_replica_would():
    calls: list = []
    replies = iter([Outlook("a", 5003.0, 0.0, 0.0, 1.0), Outlook("b", 0.0, 0.0, 0.0, 1.0)] + [Outlook("b", 5003.0, 0.0, 0.0, 1.0)] * 3)

    async def app(scope, receive, send):
        calls.append(1)
        await send({"type": "http.response.start", "status": 200, "headers": [(b"x-detserve-admit", next(replies).header().encode())]})
        await send({"type": "http.response.body", "body": b"{}"})

    middleware = ProxyAdmission(app, haproxy=False, clock=Clock(1.0), wall=Clock(5000.0))
    _call(middleware)  # replica a: full until 5003; a is the only replica heard from
    assert _call(middleware)[0]["status"] == 503 and len(calls) == 1
    middleware.routes["/yolo/predict"]["a"] = (Outlook("a", 0.0, 0.0, 0.0, 1.0), 1.0)  # a had room after all
    _call(middleware)  # answered by a, whose reply here is replica b's: b has room
    middleware.routes["/yolo/predict"]["a"] = (Outlook("a", 5003.0, 0.0, 0.0, 1.0), 1.0)
    assert _call(middleware)[0]["status"] == 200  # a is full, b is not: through
    assert _call(middleware)[0]["status"] == 503  # now b said it is full too
    assert len(calls) == 3


def test_behind_haproxy_the_middleware_lets_the_outlook_through_and_refuses_nothing():
    calls: list = []
    full = Outlook("a", open_at=1e12, need_until=1e12, least_timeout_s=0.0, spread_s=1.0)
    middleware = ProxyAdmission(_asgi([(b"x-detserve-admit", full.header().encode())], calls), haproxy=True)
    for _ in range(3):
        sent = _call(middleware)
        assert sent[0]["status"] == 200 and dict(sent[0]["headers"])[b"x-detserve-admit"] == full.header().encode()
    assert len(calls) == 3


def test_the_replica_sends_its_outlook_on_answers_and_its_refusals_say_who_refused(local_client, scenes):
    from tests.conftest import encode

    body, headers = encode(scenes[0].image), {"content-type": "image/png"}
    ok = local_client.post("/predict", content=body, headers=headers)
    outlook = Outlook.parse(ok.headers["x-detserve-admit"])
    assert ok.status_code == 200 and outlook is not None and not outlook.refuses(outlook.open_at)
    settings_ = local_client.server.scheduler.settings
    old, settings_.max_queued_images = settings_.max_queued_images, 0
    try:
        shed = local_client.post("/predict", content=body, headers=headers)
    finally:
        settings_.max_queued_images = old
    assert shed.status_code == 503 and shed.json()["error"]["code"] == "overloaded"
    assert shed.headers["x-detserve-refused-by"] == "replica" and int(shed.headers["retry-after"]) >= 1
    assert Outlook.parse(shed.headers["x-detserve-admit"]) is not None


def test_the_lua_gets_its_constants_from_python_and_keeps_none_of_its_own():
    from pathlib import Path

    import detserve.serve.proxy_admission as proxy_admission

    source = (Path(proxy_admission.__file__).with_name("haproxy_admission.lua")).read_text()
    code = "\n".join(line.split("--")[0] for line in source.splitlines())  # the code, not its comments
    for literal in ("x-detserve-admit", "x-detserve-refused-by", "x-request-timeout-seconds", "busy", "503", "5.0", "headroom"):
        assert literal not in code, literal
    rendered = render_lua().decode()
    assert 'local HEADER = "x-detserve-admit"' in rendered and f"local FRESH_S = {FRESH_S!r}" in rendered


def test_the_budget_is_the_clients_when_shorter_less_the_answer_margin():
    assert request_budget_s(30.0, None) == 30.0 - ANSWER_BEFORE_TIMEOUT_S
    assert request_budget_s(30.0, 2.0) == 2.0 - ANSWER_BEFORE_TIMEOUT_S
    assert request_budget_s(30.0, 60.0) == 30.0 - ANSWER_BEFORE_TIMEOUT_S
    assert request_budget_s(30.0, 0.2) == 0.0 and math.isclose(request_budget_s(2.5, None), 2.0)


def test_decode_cost_is_learnt_per_megapixel_from_large_images_only():
    from detserve.serve.admission import DecodeCost

    cost = DecodeCost()
    cost.observe("png", 1_000_000, 0.02)
    cost.observe("png", 64, 0.001)  # a tiny image's time is its fixed cost: it teaches nothing per megapixel
    assert cost.predict("png", 36_000_000) == pytest.approx(0.72) and cost.predict("png", 64) == pytest.approx(0.002)
    assert cost.predict("webp", 2_000_000) == pytest.approx(0.04)  # not yet measured: the dearest known format
    cost.observe("png", 1_000_000, 0.04)
    assert cost.predict("png", 1_000_000) == pytest.approx(0.8 * 0.02 + 0.2 * 0.04)
