"""Admission: one rule, computed in the replica; everything in front of it only compares.

The replica's scheduler (serve/scheduler.py) admits a request when it predicts that every admitted image,
this request's included, is answered within ``headroom`` of the time to the earliest deadline among them
(:func:`late_by`), and when the request's own images could be decoded and run before its own deadline (its
pixels, read from the image headers before any decode: :class:`DecodeCost`). The arithmetic lives here and in
the scheduler, once.

What leaves the replica is one small value, :class:`Outlook`, sent with every ``/predict`` answer in the
``x-detserve-admit`` header: the wall-clock time ``open_at`` from which a one-image request with the server's
own deadline would be admitted, and how widely to spread the ``Retry-After`` of a refusal before then. HAProxy's
Lua action (serve/haproxy_admission.lua, when HAProxy is the ingress) and the Python proxy's middleware
(serve/proxy_admission.py, when Ray's Python proxy is) refuse what arrives before ``open_at`` with the same JSON
503, and let everything else through to the replica, which decides exactly. They keep no ledger and do no
arithmetic of their own: the report ages towards leniency (the queue it describes only drains), so they are
never stricter than the replica.
"""

from __future__ import annotations

import collections
import math
import random
from dataclasses import dataclass, field

from detserve.serve import protocol

#: The replica answers this much before the proxy's own timeout fires, so that the client gets detserve's 408
#: (with its reason) rather than the proxy's. A request's budget is its deadline less this.
ANSWER_BEFORE_TIMEOUT_S = 0.5
#: The response header that carries the replica's :class:`Outlook` (HAProxy's Lua and the Python proxy strip it), and
#: the one that says which layer refused a 503 (``replica``, ``proxy`` or ``haproxy``; one without it is not
#: detserve's rule): both in the registry, serve/protocol.py.
ADMIT_HEADER, REFUSED_BY_HEADER = protocol.ADMIT_HEADER, protocol.REFUSED_BY_HEADER
#: A replica's outlook counts for this long; after it, the ingress lets requests through to the replica.
FRESH_S = 5.0


def request_budget_s(server_timeout_s: float, client_timeout_s: float | None) -> float:
    """Seconds a request has from arrival to answer: the client's timeout when shorter than the server's, less
    :data:`ANSWER_BEFORE_TIMEOUT_S`."""
    budget = server_timeout_s
    if client_timeout_s is not None and 0 < client_timeout_s < budget:
        budget = client_timeout_s
    return max(0.0, budget - ANSWER_BEFORE_TIMEOUT_S)


def late_by(now: float, drain_s: float, earliest_deadline: float, headroom: float, margin_s: float,
            latest_deadline: float = math.inf) -> tuple[float, float] | None:
    """The admission rule: ``None`` when work that takes ``drain_s`` (the queue and the new request) finishes
    inside the plan, else (predicted seconds until the last is answered, seconds until there is room).

    The plan is ``headroom`` of the time to the earliest deadline among the queued requests and this one; the
    rest absorbs what no prediction sees. The seconds until there is room are at most the time to
    ``latest_deadline`` (the last deadline in the queue): by then every queued request has been answered or
    dropped, so there is room whatever the rate.
    """
    finish = now + drain_s + margin_s
    if finish <= now + headroom * (earliest_deadline - now):
        return None
    return finish - now, max(0.0, min(finish - earliest_deadline, latest_deadline - now))


def open_at(now: float, finish: float, earliest_deadline: float, budget_s: float, headroom: float) -> float:
    """The first time at which :func:`late_by` admits one more image, if nothing else is admitted meanwhile.

    ``finish``: when the queue and one more image would be done (clock time; it does not move as the queue
    drains). A request arriving at ``t`` with ``budget_s`` is admitted once ``finish - t <= headroom * budget_s``
    and, for the earliest queued deadline ``E``, once ``finish - t <= headroom * (E - t)``; by ``E`` that request
    has been answered or dropped, so the second wait never lasts past it.
    """
    own = finish - headroom * budget_s
    queued = -math.inf
    if math.isfinite(earliest_deadline):
        if headroom >= 1:  # then the wait does not shrink as time passes: none, or until that request is gone
            queued = earliest_deadline if finish > earliest_deadline else -math.inf
        else:
            queued = min(earliest_deadline, (finish - headroom * earliest_deadline) / (1 - headroom))
    return max(now, own, queued)


@dataclass(frozen=True)
class Outlook:
    """What a replica tells the ingress with every answer: which one-image requests it would refuse now.

    Refused: one arriving before ``open_at`` (its queue, or a request in it, leaves no room before then), or one
    whose client timeout ends before ``need_until`` (arrival + ``x-request-timeout-seconds`` < ``need_until``:
    too short for the queue ahead). A client timeout under ``least_timeout_s`` goes through: even an idle replica
    could not meet it, and the replica says so (a 422, not a 503); so does one over ``max_timeout_s`` (the app's own
    request timeout: the app refuses such a deadline with a 422). ``open_at`` and ``need_until`` are wall-clock times (the ingress may be another process, or HAProxy).
    ``spread_s`` is how widely the refusals' ``Retry-After`` is spread past ``open_at``, so that a burst's
    refusals do not come back together. ``replica`` names the replica: the ingress refuses only when every fresh
    replica of the route would.
    """

    replica: str
    open_at: float
    need_until: float
    least_timeout_s: float
    spread_s: float
    max_timeout_s: float = math.inf

    def header(self) -> str:
        return (f"replica={self.replica};open_at={self.open_at:.3f};need_until={self.need_until:.3f};"
                f"least_timeout={self.least_timeout_s:.3f};spread={self.spread_s:.3f};max_timeout={min(self.max_timeout_s, 1e9):.3f}")  # Lua reads no "inf"

    @classmethod
    def parse(cls, value: bytes | str | None) -> Outlook | None:
        """The outlook in a header value; None for anything else (an older replica, a foreign header)."""
        if value is None:
            return None
        text = value.decode("latin-1") if isinstance(value, bytes) else value
        try:
            fields = dict(part.split("=", 1) for part in text.split(";"))
            outlook = cls(fields["replica"], float(fields["open_at"]), float(fields["need_until"]),
                          float(fields["least_timeout"]), float(fields["spread"]), float(fields["max_timeout"]))  # fmt: skip
        except (KeyError, ValueError):
            return None
        numbers = (outlook.open_at, outlook.need_until, outlook.least_timeout_s, outlook.spread_s)
        return outlook if all(map(math.isfinite, numbers)) and outlook.spread_s >= 0 and outlook.max_timeout_s > 0 else None

    def refuses(self, now: float, client_timeout_s: float | None = None) -> bool:
        """Whether a one-image request arriving at ``now`` (wall clock) with this client timeout is refused."""
        if client_timeout_s is not None and not self.least_timeout_s <= client_timeout_s <= self.max_timeout_s:
            return False
        if now < self.open_at:
            return True
        return client_timeout_s is not None and now + client_timeout_s < self.need_until

    def retry_after_s(self, now: float, u: float | None = None) -> float:
        """Seconds a refused client should wait: until ``open_at``, plus a uniform share ``u`` of ``spread_s``."""
        return max(0.0, self.open_at - now) + (random.random() if u is None else u) * self.spread_s


def retry_after_header(seconds: float) -> str:
    """``Retry-After`` takes whole seconds: round up, at least 1."""
    return str(max(1, math.ceil(seconds)))


@dataclass
class RetrySlots:
    """Spreads the replica's refusals' Retry-After at the rate it can take them back.

    Every refusal in a burst sees the same queue, so the drain alone would give them all the same Retry-After
    and they would come back together, to be refused together again. Instead each refusal books the next free
    slot, ``seconds`` (its own work) after the last one, no sooner than its own Retry-After and no later than
    ``horizon_s`` (its deadline's budget) after that: clients that never come back cannot push the line out for ever.
    """

    next_free: float = -math.inf

    def book(self, now: float, retry_after_s: float, seconds: float, horizon_s: float) -> float:
        soonest = now + retry_after_s
        at = min(max(soonest, self.next_free), soonest + max(0.0, horizon_s))
        self.next_free = at + seconds
        return at - now


#: Decode + prepare cost assumed before a format has been measured, in seconds per megapixel (a 12 MP JPEG
#: took about 40 ms here with OpenCV, a PNG several times that): on the high side, so a first request is not
#: admitted on a guess that is too kind.
DEFAULT_DECODE_S_PER_MP = 0.03
#: The least an image costs to decode and prepare, whatever its size (file parse, letterbox, copies).
MIN_DECODE_S = 0.002
#: Only images this large teach the per-megapixel rate: a small one's time is mostly the fixed cost (a 64-pixel
#: PNG taking a millisecond read as 15 s a megapixel, and refused the next ordinary photo as hopeless).
DECODE_LEARN_MIN_PIXELS = 250_000
DECODE_ALPHA = 0.2


@dataclass
class DecodeCost:
    """Seconds to decode and prepare an image, per megapixel, by format: measured at start, then an EWMA of what
    the replica's decode threads really take. The pixels come from the image's header, before any decode."""

    s_per_mp: dict[str, float] = field(default_factory=dict)

    def predict(self, fmt: str, pixels: int) -> float:
        rate = self.s_per_mp.get(fmt)
        if rate is None:
            rate = max(self.s_per_mp.values(), default=DEFAULT_DECODE_S_PER_MP)
        return max(MIN_DECODE_S, rate * pixels / 1e6)

    def observe(self, fmt: str, pixels: int, seconds: float) -> None:
        if pixels < DECODE_LEARN_MIN_PIXELS or not math.isfinite(seconds):
            return
        rate = seconds / (pixels / 1e6)
        old = self.s_per_mp.get(fmt)
        self.s_per_mp[fmt] = rate if old is None else (1 - DECODE_ALPHA) * old + DECODE_ALPHA * rate


@dataclass(frozen=True)
class RequestCost:
    """What admission knows of a request before decoding it: its images, and their decode time by their pixels."""

    images: int
    decode_s: float = 0.0  # all of its images, one after another (a request decodes one image at a time)
    pixels: int = 0


#: Throughput counts over a replica's most recent backlogged batches that hold at least this many images and
#: this much backlogged time (seconds). Not less: a burst's first seconds are spent taking in its connections
#: (the replica's HTTP server parses every request under the GIL), and the batches that end meanwhile ran at a
#: fifth to a half of what the replica then did for the rest of the burst; over 2 s windows that dip refused a
#: sixth of a 300-photo burst that was all answered 13 s before its deadline.
THROUGHPUT_MIN_IMAGES = 32
THROUGHPUT_MIN_S = 4.0
#: Batches remembered for it (a replica of tiny fast batches measures over these, even if under THROUGHPUT_MIN_S).
THROUGHPUT_BATCHES = 512
#: A measurement counts for this long after its last batch (seconds); then the cost curve stands in again.
THROUGHPUT_FRESH_S = 5.0


@dataclass
class Throughput:
    """Images a replica answers per second while it has a backlog: what admission plans a queue's drain with.

    The engine's cost curve sees the engine alone, measured at start. Under a burst the replica also decodes,
    takes in connections and shares its cores, and the curve's figure was 1.5x too kind; the curve figures then
    measured under the burst rose with the contention, and a slowdown learnt from requests (took / predicted)
    multiplied the same contention in a second time: a cold burst of 300 mixed photos was predicted at 37 s
    and refused a quarter of its requests, all of which the replica answered within 11 s. So the drain is
    planned with what the replica really answers: images finished per second of time with a backlog (more
    images admitted than its lanes run at once). Nothing is counted while the queue is shorter than that (a
    lone request measures its own latency, not the replica's capacity); before the first backlog, and once
    the last measured one is ``THROUGHPUT_FRESH_S`` old, the cost curve stands in.
    """

    busy_s: float = 0.0  # time with a backlog, summed
    busy_since: float | None = None  # the backlog's start, while there is one
    images: int = 0  # images finished while there was a backlog, summed
    samples: collections.deque = field(default_factory=lambda: collections.deque(maxlen=THROUGHPUT_BATCHES))
    rate: float | None = None  # over the most recent window, updated at each batch

    def busy_until(self, now: float) -> float:
        return self.busy_s + (now - self.busy_since if self.busy_since is not None else 0.0)

    def backlog(self, now: float, backlogged: bool) -> None:
        """The queue changed: ``backlogged`` says whether it now holds more images than the lanes run at once."""
        if backlogged and self.busy_since is None:
            self.busy_since = now
            if not self.samples:  # the first backlog: its time counts from here
                self.samples.append((now, self.busy_s, self.images))
        elif not backlogged and self.busy_since is not None:
            self.busy_s += now - self.busy_since
            self.busy_since = None

    def finished(self, now: float, images: int) -> None:
        """A batch of ``images`` ended; it counts if the replica had a backlog."""
        if self.busy_since is None:
            return
        self.images += images
        self.samples.append((now, self.busy_until(now), self.images))
        self.rate = self._measure()

    def _measure(self) -> float | None:
        _, busy1, images1 = self.samples[-1]
        for _, busy0, images0 in reversed(self.samples):
            if busy1 - busy0 >= THROUGHPUT_MIN_S and images1 - images0 >= THROUGHPUT_MIN_IMAGES:
                return (images1 - images0) / (busy1 - busy0)
        _, busy0, images0 = self.samples[0]
        full = len(self.samples) == self.samples.maxlen and busy1 > busy0
        return (images1 - images0) / (busy1 - busy0) if full else None

    def images_per_s(self, now: float) -> float | None:
        """The measured rate; None before there is enough to go by, or once it is stale."""
        if self.rate is None or now - self.samples[-1][0] > THROUGHPUT_FRESH_S:
            return None
        return self.rate
