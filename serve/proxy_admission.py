"""Admission in the HTTP proxy: refuse a request that would miss its deadline before it makes the replica trip.

The replica's scheduler decides admission exactly (serve/scheduler.py), but a
503 it gives has already cost the whole proxy -> replica hop: about 8 CPU-ms
on a 2-core machine, close to half an image's inference at 320 px. Under 2x
overload the refusals then take the cores the answers need, and goodput falls
to half the peak (README, "Overload"). So the proxy applies the same rule
first, in front of the hop, from what it knows itself and what the replicas
tell it:

- **What the proxy knows.** Every request it has forwarded and not yet seen
  answered, each with its deadline and an estimate of its images (its
  Content-Length over the bytes per image seen so far). That is the queue the
  replica has, plus what is in transit, so the proxy is a little stricter than
  the replica, never more lenient: the replica's check stays as the backstop
  (Python handles, other proxies, a wrong estimate) and rarely fires.
- **What the replicas report.** Every answer from ``/predict`` carries
  ``x-detserve-load`` (:class:`LoadReport`): the replica's id, the images per
  second it really serves (its cost curve over its ``slowdown``), the server's
  request timeout, the plan's headroom and margin, and the images in that
  request. The proxy strips the header before the client sees it. The rates of
  the replicas heard from within ``FRESH_S`` are summed; with no fresh report
  (start, idle) the proxy admits everything and the replica decides.
- **The rule** is :func:`detserve.serve.scheduler.late_by`, the replica's own:
  the images in flight and this request's must be answered within ``headroom``
  of the time to the earliest deadline among them. A refusal is a JSON 503
  ``overloaded`` with ``Retry-After``, answered without reading the body. A
  request that could not make its deadline even alone goes on to the replica,
  which answers it 422 ``deadline_too_short`` with the reason.

Under the HAProxy ingress (serve/ingress.py, the default) this middleware runs
in each replica's own HTTP server instead, in front of the app, and each
replica counts its own requests against its own rate (HAProxy spreads them).
A refusal there still costs the replica's HTTP server the request, so every
/predict answer also tells HAProxy when this replica next has room
(``x-detserve-admit``, :meth:`RouteAdmission.outlook`), and HAProxy refuses
what arrives before then itself (serve/haproxy_admission.lua), with the same
rule for a one-image request: most refusals then never reach Python.

With several proxies (one per node), each counts only its own requests against
the whole capacity, so each is more lenient than one would be; the replicas'
check still holds the deadline.
"""

from __future__ import annotations

import heapq
import itertools
import json
import math
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from detserve.serve.scheduler import PROXY_MARGIN_S, RetrySlots, late_by, request_budget_s, retry_after_header

#: The response header a replica reports its load in (stripped by the proxy).
LOAD_HEADER = b"x-detserve-load"
#: The client's deadline header (Ray's proxy honours it for its own timeout too).
TIMEOUT_HEADER = b"x-request-timeout-seconds"
#: A replica's report counts for this long; after it, the replica is taken to be gone.
FRESH_S = 5.0
#: Every refusal's message carries this, so clients and benchmarks can tell it from the replica's.
REFUSED_HERE = "refused at the ingress, before the app"
#: EWMA weight of a new bytes-per-image figure.
BYTES_ALPHA = 0.2
#: The response header that tells HAProxy when this replica next has room (serve/haproxy_admission.lua strips it).
ADMIT_HEADER = b"x-detserve-admit"
#: HAProxy's own refusals carry this header, ``haproxy`` (serve/haproxy_admission.lua).
REFUSED_BY_HEADER = "x-detserve-refused-by"
#: Set in every Ray process when HAProxy is the ingress (serve/ingress.py); then ADMIT_HEADER is sent.
HAPROXY_ENV = "RAY_SERVE_ENABLE_HA_PROXY"


@dataclass(frozen=True)
class LoadReport:
    """One replica's load, as it answers a /predict request (``x-detserve-load: replica=...;rate=...``)."""

    replica: str
    images_per_s: float | None  # what admission plans with; None until the replica has measured its cost curve
    request_timeout_s: float
    headroom: float
    margin_s: float
    max_images: int
    images: int  # in the request this answers

    def header(self) -> str:
        rate = "" if self.images_per_s is None else f"{self.images_per_s:.4g}"
        return (f"replica={self.replica};rate={rate};timeout={self.request_timeout_s:g};headroom={self.headroom:g};"
                f"margin={self.margin_s:g};max_images={self.max_images};images={self.images}")  # fmt: skip

    @classmethod
    def parse(cls, value: bytes | str) -> LoadReport | None:
        """The report in a header value, or None when it does not parse (an older replica, a foreign header)."""
        text = value.decode("latin-1") if isinstance(value, bytes) else value
        try:
            fields = dict(part.split("=", 1) for part in text.split(";"))
            rate = float(fields["rate"]) if fields["rate"] else None
            report = cls(fields["replica"], rate, float(fields["timeout"]), float(fields["headroom"]),
                         float(fields["margin"]), int(fields["max_images"]), int(fields["images"]))  # fmt: skip
        except (KeyError, ValueError):
            return None
        if rate is not None and not (math.isfinite(rate) and rate > 0):
            return None
        return report


def parse_timeout(value: bytes | str | None) -> float | None:
    """A client's ``x-request-timeout-seconds`` in seconds, if it gave a usable one."""
    try:
        seconds = float(value) if value is not None else None
    except ValueError:
        return None
    return seconds if seconds is not None and math.isfinite(seconds) else None


@dataclass(frozen=True)
class Refusal:
    retry_after_s: float
    predicted_s: float
    earliest_s: float  # seconds to the earliest deadline the plan had to meet
    in_flight_images: int


@dataclass
class RouteAdmission:
    """The proxy's view of one /predict route: the replicas' rates and the requests in flight."""

    clock: Callable[[], float] = time.monotonic
    rates: dict[str, tuple[float, float]] = field(default_factory=dict)  # replica -> (images/s, heard at)
    latest: LoadReport | None = None  # timeout, headroom, margin, max_images (the same for every replica of an app)
    bytes_per_image: float | None = None
    in_flight: dict[int, tuple[float, int]] = field(default_factory=dict)  # token -> (deadline, images)
    in_flight_images: int = 0
    refused: int = 0
    retry_slots: RetrySlots = field(default_factory=RetrySlots)
    _deadlines: list[tuple[float, int]] = field(default_factory=list)  # heap; entries of finished requests are skipped
    _tokens: itertools.count = field(default_factory=itertools.count)

    def images_per_s(self, now: float) -> float | None:
        """The summed rate of the replicas heard from within ``FRESH_S``; None when there is none."""
        for replica in [r for r, (_, heard) in self.rates.items() if now - heard > FRESH_S]:
            del self.rates[replica]
        return sum(rate for rate, _ in self.rates.values()) or None

    def estimate_images(self, content_length: int | None) -> int:
        """A request's images, from its size: at least 1, at most the app's ``max_images``."""
        if content_length is None or not self.bytes_per_image:
            return 1
        cap = self.latest.max_images if self.latest else 1
        return max(1, min(cap, round(content_length / self.bytes_per_image)))

    def decide(self, content_length: int | None, client_timeout_s: float | None, images: int | None = None) -> int | Refusal:
        """A token for an admitted request (give it back with :meth:`leave`), or the :class:`Refusal`.

        ``images``: the request's image count when the headers tell it (a raw ``image/*`` body is one image);
        otherwise it is estimated from the Content-Length.
        """
        now = self.clock()
        # An estimate counts in the queue, but a request is refused only as if it held what it surely holds:
        # one image, or the count its headers give. Refused by its estimate, 12 photos of 12 MP counted as the
        # app's limit of 64 (the bytes per image were learnt from small ones), and a request the replica
        # would admit was turned away from an empty queue.
        sure = images or 1
        images = images or self.estimate_images(content_length)
        rate, report = self.images_per_s(now), self.latest
        deadline = now + request_budget_s(report.request_timeout_s, client_timeout_s) if report else math.inf
        # A request that could not make its deadline even alone goes on: the replica answers it 422 with the reason.
        hopeless = rate is not None and report is not None and images / rate + report.margin_s > deadline - now
        if rate is not None and report is not None and not hopeless:
            earliest = min(deadline, self._earliest_in_flight())
            plan = (now, self.in_flight_images + sure, rate, earliest, report.headroom, report.margin_s)
            if late_by(*plan) is not None:
                # Refused: only now the Retry-After's bound, the latest deadline in flight (a scan of them all).
                late = late_by(*plan, max([deadline, *(d for d, _ in self.in_flight.values())]))
                self.refused += 1
                retry_after_s = self.retry_slots.book(now, late[1], sure, rate, deadline - now)
                return Refusal(retry_after_s, late[0], earliest - now, self.in_flight_images)
        token = next(self._tokens)
        self.in_flight[token] = (deadline, images)
        self.in_flight_images += images
        if math.isfinite(deadline):
            heapq.heappush(self._deadlines, (deadline, token))
        return token

    def outlook(self, now: float, wall_offset_s: float = 0.0) -> str:
        """For HAProxy (``ADMIT_HEADER``): when a one-image request would next be admitted, as :meth:`decide` rules.

        ``finish``: when the images in flight and one more are done, if nothing else is admitted: a request due
        by ``now' + budget`` is admitted once ``finish - now' <= headroom * budget``. ``until``: before it, a request in flight would miss its own
        deadline (``finish > now' + headroom * (deadline - now')``). Both are wall-clock seconds (HAProxy's
        clock; ``wall_offset_s`` = ``time.time() - clock()``). With no measured rate yet, ``rate=0``: admit.
        """
        rate, report = self.images_per_s(now), self.latest
        if rate is None or report is None:
            return "finish=0;until=0;budget=0;headroom=0;margin=0;alone=0;rate=0"
        finish = now + (self.in_flight_images + 1) / rate + report.margin_s
        earliest, h = self._earliest_in_flight(), report.headroom
        until = -math.inf
        if math.isfinite(earliest):
            until = earliest if h >= 1 else min(earliest, (finish - h * earliest) / (1 - h))
        return (f"finish={finish + wall_offset_s:.3f};until={max(0.0, until + wall_offset_s):.3f};"
                f"budget={request_budget_s(report.request_timeout_s, None):.3f};headroom={report.headroom:g};"
                f"margin={PROXY_MARGIN_S:g};"
                f"alone={1 / rate + report.margin_s:.4f};rate={rate:.4g}")  # fmt: skip

    def _earliest_in_flight(self) -> float:
        """The earliest deadline of the requests in flight (inf with none); finished ones leave the heap here."""
        while self._deadlines and self._deadlines[0][1] not in self.in_flight:
            heapq.heappop(self._deadlines)
        return self._deadlines[0][0] if self._deadlines else math.inf

    def leave(self, token: int) -> None:
        _, images = self.in_flight.pop(token)
        self.in_flight_images -= images

    def heard(self, report: LoadReport, content_length: int | None) -> None:
        self.latest = report
        if report.images_per_s is not None:
            self.rates[report.replica] = (report.images_per_s, self.clock())
        if content_length and report.images > 0:
            per_image = content_length / report.images
            old = self.bytes_per_image
            self.bytes_per_image = per_image if old is None else (1 - BYTES_ALPHA) * old + BYTES_ALPHA * per_image


def refusal_body(refusal: Refusal) -> tuple[dict, bytes]:
    retry = retry_after_header(refusal.retry_after_s)
    message = (
        f"the server is busy: the {refusal.in_flight_images} images in flight would take {refusal.predicted_s:.1f} s, "
        f"past the deadline {max(0.0, refusal.earliest_s):.1f} s away ({REFUSED_HERE}). Retry after {retry} s "
        "(the Retry-After header), or send fewer images per request"
    )
    return {"retry-after": retry}, json.dumps({"error": {"code": "overloaded", "message": message}}).encode()


class ProxyAdmission:
    """Pure ASGI middleware for Ray's proxy: :class:`RouteAdmission` on every ``POST .../predict``."""

    def __init__(self, app, haproxy: bool | None = None):
        self.app = app
        self.routes: dict[str, RouteAdmission] = {}
        #: behind HAProxy (in a replica's own HTTP server): every answer carries ADMIT_HEADER
        self.haproxy = os.environ.get(HAPROXY_ENV) == "1" if haproxy is None else haproxy

    def admit_header(self, route: RouteAdmission) -> list[tuple[bytes, bytes]]:
        if not self.haproxy:
            return []
        return [(ADMIT_HEADER, route.outlook(route.clock(), time.time() - route.clock()).encode())]

    async def __call__(self, scope, receive, send):
        path = scope.get("path", "").rstrip("/")
        if scope["type"] != "http" or scope.get("method") != "POST" or not path.endswith("/predict"):
            return await self.app(scope, receive, send)
        route = self.routes.setdefault(path, RouteAdmission())
        headers = dict(scope.get("headers", []))
        length = headers.get(b"content-length", b"")
        content_length = int(length) if length.isdigit() else None
        # A raw image body is one image. Estimated from its size instead, a burst of photos larger than the
        # average counted as 417 images for 300 requests, and the last 38 were refused.
        single = headers.get(b"content-type", b"").lower().startswith(b"image/")
        verdict = route.decide(content_length, parse_timeout(headers.get(TIMEOUT_HEADER)), 1 if single else None)
        if isinstance(verdict, Refusal):
            extra, payload = refusal_body(verdict)
            response_headers = [(b"content-type", b"application/json"), (b"content-length", str(len(payload)).encode())]
            response_headers += [(k.encode(), v.encode()) for k, v in extra.items()] + self.admit_header(route)
            await send({"type": "http.response.start", "status": 503, "headers": response_headers})
            await send({"type": "http.response.body", "body": payload})
            return

        left = False  # the request leaves the count when its answer starts: its images and deadline are done

        async def _send(message):
            nonlocal left
            if message["type"] == "http.response.start":
                kept = []
                for key, value in message.get("headers", []):
                    if key.lower() == LOAD_HEADER:
                        report = LoadReport.parse(value)
                        if report is not None:
                            route.heard(report, content_length)
                    else:
                        kept.append((key, value))
                route.leave(verdict)
                left = True
                message = {**message, "headers": kept + self.admit_header(route)}
            await send(message)

        try:
            await self.app(scope, receive, _send)
        finally:
            if not left:
                route.leave(verdict)
