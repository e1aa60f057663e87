"""Admission in the proxy (serve/proxy_admission.py): the replica's rule, applied before the replica trip."""

from __future__ import annotations

import asyncio
import json

from detserve.serve.proxy_admission import REFUSED_HERE, LoadReport, ProxyAdmission, Refusal, RouteAdmission
from detserve.serve.scheduler import PROXY_MARGIN_S, CostCurve, Overloaded, Scheduler, Settings


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def report(rate: float | None = 10.0, replica: str = "a", timeout: float = 2.0 + PROXY_MARGIN_S, images: int = 1) -> LoadReport:
    return LoadReport(replica, rate, timeout, headroom=0.8, margin_s=0.05, max_images=64, images=images)


def admitted(route: RouteAdmission, n: int, **kwargs) -> list[int | Refusal]:
    return [route.decide(**{"content_length": None, "client_timeout_s": None, **kwargs}) for _ in range(n)]


def test_the_load_report_round_trips_and_junk_is_ignored():
    r = report(12.5, "replica-x7")
    assert LoadReport.parse(r.header().encode()) == r
    assert LoadReport.parse(report(None).header()) == report(None)
    for junk in (b"", b"rate=3", b"replica=a;rate=x;timeout=1;headroom=1;margin=0;max_images=1;images=1",
                 report(-1.0).header().encode(), report(float("inf")).header().encode()):  # fmt: skip
        assert LoadReport.parse(junk) is None


def test_without_a_report_everything_goes_to_the_replica():
    route = RouteAdmission(clock=Clock())
    assert all(isinstance(v, int) for v in admitted(route, 500))
    route.heard(report(None), None)  # a replica that has not measured its curve yet
    assert isinstance(route.decide(None, None), int)


def test_the_proxy_admits_what_the_plan_holds_and_refuses_the_rest_with_a_retry_after():
    clock = Clock()
    route = RouteAdmission(clock=clock)
    route.heard(report(10.0), None)
    # budget 2.0 s; plan 0.8 x 2.0 = 1.6 s; n images finish at n / 10 + 0.05 s: n <= 15
    verdicts = admitted(route, 20)
    tokens = [v for v in verdicts if isinstance(v, int)]
    refusals = [v for v in verdicts if isinstance(v, Refusal)]
    assert len(tokens) == 15 and len(refusals) == 5 and route.refused == 5
    assert all(r.in_flight_images == 15 and abs(r.predicted_s - 1.65) < 1e-9 for r in refusals)
    # Each refusal books the next tenth of a second (one image at 10/s), so they do not all come back together.
    assert [round(r.retry_after_s, 9) for r in refusals] == [0.0, 0.1, 0.2, 0.3, 0.4]
    for token in tokens[:5]:  # answered: room for five more
        route.leave(token)
    assert sum(isinstance(v, int) for v in admitted(route, 6)) == 5


def test_a_dipped_rate_does_not_send_clients_away_past_the_last_deadline_in_flight():
    clock = Clock()
    route = RouteAdmission(clock=clock)
    route.heard(report(10.0), None)
    admitted(route, 15)
    route.heard(report(1.0), None)  # the burst's dip: 15 images now look like 15 s of work
    refusal = route.decide(None, None)
    assert isinstance(refusal, Refusal) and refusal.predicted_s > 15
    assert refusal.retry_after_s == 2.0  # every request in flight is answered or timed out within its 2.0 s


def test_the_earliest_deadline_in_flight_shrinks_the_plan():
    clock = Clock()
    route = RouteAdmission(clock=clock)
    route.heard(report(10.0), None)
    admitted(route, 5)
    clock.now += 1.5  # the five have 0.5 s left: 5 + n images must finish within 0.8 x 0.5 s
    assert isinstance(route.decide(None, None), Refusal)
    clock.now += 0.6  # past their deadline and still in flight: the plan is already late
    assert isinstance(route.decide(None, None), Refusal)


def test_a_client_timeout_shortens_the_deadline_but_never_lengthens_it():
    route = RouteAdmission(clock=Clock())
    route.heard(report(10.0), None)
    assert sum(isinstance(v, int) for v in admitted(route, 20, client_timeout_s=1.0 + PROXY_MARGIN_S)) == 7  # 0.8 s plan
    route = RouteAdmission(clock=Clock())
    route.heard(report(10.0), None)
    assert sum(isinstance(v, int) for v in admitted(route, 40, client_timeout_s=60.0)) == 15


def test_a_request_nothing_could_answer_in_time_goes_on_to_the_replica_for_its_422():
    route = RouteAdmission(clock=Clock())
    route.heard(report(10.0), None)
    assert isinstance(route.decide(None, 0.55), int)  # 0.05 s budget: the replica says why, with a 422


def test_replicas_add_their_rates_and_one_unheard_for_long_drops_out():
    clock = Clock()
    route = RouteAdmission(clock=clock)
    route.heard(report(10.0, "a"), None)
    route.heard(report(10.0, "b"), None)
    assert route.images_per_s(clock.now) == 20.0
    assert sum(isinstance(v, int) for v in admitted(route, 40)) == 31  # n / 20 + 0.05 <= 1.6
    clock.now += 3
    route.heard(report(10.0, "b"), None)
    clock.now += 3  # a: 6 s without a word
    assert route.images_per_s(clock.now) == 10.0


def test_images_are_estimated_from_the_body_size_within_the_apps_limit():
    route = RouteAdmission(clock=Clock())
    assert route.estimate_images(10_000_000) == 1  # nothing learnt yet
    route.heard(report(10.0, images=4), 400_000)  # 100 kB per image
    assert route.estimate_images(100_000) == 1 and route.estimate_images(1_000) == 1
    assert route.estimate_images(1_000_000) == 10 and route.estimate_images(10**9) == 64
    assert route.estimate_images(None) == 1


def test_the_proxy_and_the_replica_decide_alike():
    """The same rate, timeout and queue: the proxy refuses from the same request on as the scheduler."""
    curve = CostCurve({1: 0.1})  # 10 images/s, one lane
    scheduler = Scheduler(lambda items, params: items, Settings(max_batch_size=1), curve=curve, clock=Clock())
    budget = 2.0
    replica = 0
    try:
        for _ in range(40):
            scheduler.admit(1, scheduler.clock() + budget)
            replica += 1
    except Overloaded:
        pass
    route = RouteAdmission(clock=Clock())
    route.heard(report(scheduler.effective_images_per_s()), None)
    proxy = sum(isinstance(v, int) for v in admitted(route, 40))
    assert proxy == replica == 15


def _asgi(route_headers: list[tuple[bytes, bytes]], calls: list):
    async def app(scope, receive, send):
        calls.append(scope["path"])
        await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"application/json"), *route_headers]})
        await send({"type": "http.response.body", "body": b"{}"})

    return app


def _call(middleware, path: str = "/yolo/predict", method: str = "POST", headers: tuple = ((b"content-length", b"1000"),)):
    sent: list[dict] = []

    async def receive():
        raise AssertionError("the body is not read")

    async def send(message):
        sent.append(message)

    scope = {"type": "http", "method": method, "path": path, "headers": list(headers)}
    asyncio.run(middleware(scope, receive, send))
    return sent


def test_the_middleware_learns_from_answers_strips_the_header_and_refuses_without_the_replica():
    calls: list = []
    middleware = ProxyAdmission(_asgi([(b"x-detserve-load", report(0.6).header().encode())], calls))
    first = _call(middleware)
    assert first[0]["status"] == 200 and all(k != b"x-detserve-load" for k, _ in first[0]["headers"])
    route = middleware.routes["/yolo/predict"]
    assert route.rates["a"][0] == 0.6 and route.in_flight_images == 0 and route.bytes_per_image == 1000
    # 0.6 images/s: one image takes 1.72 s alone, over the plan of 1.6 s but within the 2.0 s budget: refused here
    refused = _call(middleware)
    assert len(calls) == 1 and refused[0]["status"] == 503
    headers = dict(refused[0]["headers"])
    assert headers[b"content-type"] == b"application/json" and int(headers[b"retry-after"]) >= 1
    error = json.loads(refused[1]["body"])["error"]
    assert error["code"] == "overloaded" and REFUSED_HERE in error["message"]
    # other routes and methods pass untouched
    _call(middleware, "/yolo/stats", "GET")
    _call(middleware, "/other/predict")
    assert calls == ["/yolo/predict", "/yolo/stats", "/other/predict"]


def test_the_replica_reports_its_load_on_answers_and_on_its_own_refusals(local_client, scenes):
    from tests.conftest import encode

    body, headers = encode(scenes[0].image), {"content-type": "image/png"}
    ok = local_client.post("/predict", content=body, headers=headers)
    load = LoadReport.parse(ok.headers["x-detserve-load"])
    assert ok.status_code == 200 and load is not None and load.images == 1 and load.images_per_s > 0
    assert load.request_timeout_s == local_client.server.args.request_timeout_s and load.max_images == 4
    settings = local_client.server.scheduler.settings
    old, settings.max_queued_images = settings.max_queued_images, 0
    try:
        shed = local_client.post("/predict", content=body, headers=headers)
    finally:
        settings.max_queued_images = old
    assert shed.status_code == 503 and shed.json()["error"]["code"] == "overloaded"
    assert LoadReport.parse(shed.headers["x-detserve-load"]) is not None and shed.headers["retry-after"]


def test_a_raw_image_body_counts_as_one_image_whatever_its_size():
    calls: list = []
    middleware = ProxyAdmission(_asgi([(b"x-detserve-load", report(1000.0).header().encode())], calls))
    _call(middleware)  # learns 1000 bytes per image
    route = middleware.routes["/yolo/predict"]
    counted: list[int] = []
    decide = route.decide
    route.decide = lambda length, timeout, images=None: counted.append(images or route.estimate_images(length)) or decide(length, timeout, images)
    big = (b"content-length", b"3000")  # three times the average photo
    _call(middleware, headers=(big, (b"content-type", b"image/jpeg")))
    route.bytes_per_image = 1000.0  # (the raw answer above taught it 1400)
    _call(middleware, headers=(big, (b"content-type", b"multipart/form-data; boundary=x")))
    assert counted == [1, 3]  # a raw body is one image; a multipart one is estimated from its size


def haproxy_waits(outlook: str, now: float, client_timeout_s: float | None) -> bool:
    """serve/haproxy_admission.lua's rule (``wait_for``), from the header alone: True when HAProxy refuses."""
    r = {k: float(v) for k, v in (part.split("=") for part in outlook.split(";"))}
    if r["rate"] <= 0:
        return False
    budget = r["budget"]
    if client_timeout_s is not None and 0 < client_timeout_s and client_timeout_s - r["margin"] < budget:
        budget = max(0.0, client_timeout_s - r["margin"])
    if r["alone"] > budget:
        return False
    return max(r["until"] - now, r["finish"] - now - r["headroom"] * budget) > 1e-6


def test_what_haproxy_is_told_refuses_exactly_what_the_proxy_would_refuse():
    # The header HAProxy decides from (RouteAdmission.outlook) gives, for a one-image request at any later moment
    # with no admission in between, the decision the middleware itself would make then: the same rule, moved.
    import collections
    import random

    rng = random.Random(7)
    outcomes = collections.Counter()
    for _ in range(1500):
        clock = Clock()
        route = RouteAdmission(clock=clock)
        route.heard(report(rng.uniform(2, 40), timeout=rng.choice([3.0, 10.0, 30.0])), None)
        for _ in range(rng.randrange(0, 80)):  # a queue of mixed deadlines, arriving over a second
            clock.now += rng.uniform(0, 0.02)
            route.decide(None, rng.choice([None, 1.0, 2.0, 5.0, 60.0]))
        header = route.outlook(clock.now)
        later = rng.uniform(0, 1.5)
        timeout = rng.choice([None, 0.3, 1.0, 2.0, 4.0, 60.0])
        # The middleware's decision at now + later, as if the queue had drained at its rate meanwhile.
        drained = RouteAdmission(clock=clock, rates=dict(route.rates), latest=route.latest)
        rate = route.images_per_s(clock.now)
        left = route.in_flight_images - rate * later
        for deadline, images in route.in_flight.values():
            drained.in_flight[len(drained.in_flight)] = (deadline, images)
            drained._deadlines.append((deadline, len(drained.in_flight) - 1))
        drained._deadlines.sort()
        drained.in_flight_images = left  # fractional: exactly what the rule computes with
        clock.now += later
        live = [d for d, _ in route.in_flight.values() if d > clock.now]
        if left < 0 or len(live) < len(route.in_flight):
            continue  # by then a request in flight is answered or past its deadline: outside the header's promise
        refused = isinstance(drained.decide(None, timeout), Refusal)
        assert haproxy_waits(header, clock.now, timeout) == refused, (header, later, timeout)
        outcomes[refused] += 1
    assert outcomes[True] > 100 and outcomes[False] > 100, outcomes  # both sides of the rule, many times


def test_every_answer_behind_haproxy_says_when_there_is_room_and_the_python_proxy_sends_nothing():
    from detserve.serve.proxy_admission import ADMIT_HEADER, LOAD_HEADER

    async def app(scope, receive, send):
        await send({"type": "http.response.start", "status": 200, "headers": [(LOAD_HEADER, report(4.0).header().encode())]})
        await send({"type": "http.response.body", "body": b"{}"})

    async def one(middleware) -> dict:
        sent = []

        async def send(message):
            sent.append(message)

        async def receive():
            return {"type": "http.request", "body": b"x"}

        scope = {"type": "http", "method": "POST", "path": "/yolo/predict", "headers": [(b"content-type", b"image/jpeg")]}
        await middleware(scope, receive, send)
        return dict(sent[0]["headers"])

    behind = ProxyAdmission(app, haproxy=True)
    headers = asyncio.run(one(behind))
    assert LOAD_HEADER not in headers
    fields = dict(part.split("=") for part in headers[ADMIT_HEADER].decode().split(";"))
    assert float(fields["rate"]) == 4.0 and float(fields["budget"]) == 2.0 and float(fields["headroom"]) == 0.8
    assert ADMIT_HEADER not in asyncio.run(one(ProxyAdmission(app, haproxy=False)))


def test_an_estimate_counts_in_the_queue_but_never_refuses_more_than_one_sure_image():
    # 12 photos of 12 MP after small ones: the body size says 64 images (the app's limit), the request holds 12.
    route = RouteAdmission(clock=Clock())
    route.heard(report(40.0, images=4), 400_000)  # 100 kB an image; 2 s budget, 0.8 of it planned: 64 do not fit
    token = route.decide(20_000_000, None)
    assert isinstance(token, int) and route.in_flight_images == 64  # the replica decides from the real count
    assert isinstance(route.decide(None, None), Refusal)  # behind it, the queue it may hold is full
