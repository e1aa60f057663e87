"""The replica's scheduler: admission by deadline, fair batches of images, a batch size from measured cost.

Plain asyncio, no Ray, so tests drive it directly with a fake engine.

- **Admission** (the rule and its arithmetic: serve/admission.py). A request is admitted only when the
  scheduler predicts that every admitted image, this request's included, is answered within ``headroom`` of
  the time to the earliest deadline among them, and that its own images (their pixels, from their headers)
  can be decoded one after another and run before its own deadline. The engine's rate comes from what the
  replica measures (seconds per batch at each batch size, and its engine lanes); decode's from what its
  decode threads take per megapixel. Otherwise :class:`Overloaded` at once, with the time until enough work
  drains (the ``Retry-After``), or, when even an idle replica could not make it, a "hopeless" refusal (422).
  Because batches are shared round-robin (below), no admitted request finishes later than the whole queue
  drains, so the check holds for every request, not only the newest. :meth:`Scheduler.outlook` sums the
  rule up for the ingress, which only compares.
- **Fairness.** Batches are made of images, not requests: each batch takes one
  ready image from each request in turn, and a request with nothing run yet
  goes ahead of those already served, so a 64-image request cannot starve a
  one-image request that arrives behind it. A request's images may run in
  several batches; its results come back whole and in input order.
- **Express lane.** A batch in flight cannot be interrupted, so fresh-first
  ordering alone still left a one-photo request waiting for the large
  request's image that had just taken the lane: a whole batch, nearly every
  time with a closed-loop client (it sends its next photo just after the lane
  moved on). While every lane runs a continuing (bulk) batch, one more engine
  call may run, for requests with nothing run yet only, and no new bulk batch
  starts until it is done (it had shared the cores with the next one). It is
  never used under a load of small requests (their batches are fresh ones), so
  it borrows a core for at most one small batch beside each large request's batch.
- **Deadlines.** The caller bounds a request by its deadline and then
  releases it (``release(ticket, "deadline")``): its images that have not
  started are dropped, not run for nobody. A cancelled request (client gone)
  is dropped the same way.
- **Throughput.** The engine's cost curve does not see what else the replica does under load: decode, the
  event loop, the proxy, other processes on the same cores. So a queue's drain is planned at the rate the
  replica really answers images while it has a backlog (:class:`detserve.serve.admission.Throughput`); the
  curve stands in before the first backlog and once the measured one is stale.
- **Batch policy.** :class:`CostCurve` holds seconds per batch by size,
  measured at warm-up and updated by every batch; one batch in
  ``EXPLORE_EVERY`` runs a neighbouring size so that its figure stays current
  (a bigger one only from a backlog), and a size not run for ``STALE_AFTER``
  batches is not chosen on its old figure. From a backlog the batch size is the one
  with the lowest cost per image (within 15 %, the largest: a backlog waits on
  throughput, and a bigger batch pays the per-call costs of a busy replica
  once for more images), up to the configured cap: large batches on a GPU, and
  on a CPU whenever the curve is flat within the figures' noise; small ones
  where bigger batches measure clearly dearer. A short queue (fewer than two such
  batches ready) is not waiting on throughput: it goes the way that answers
  its images soonest on average (:meth:`Scheduler.batch_size_now`): one at a
  time where a pair costs more than 1.5 singles, all at once on a GPU.
"""

from __future__ import annotations

import asyncio
import collections
import heapq
import itertools
import math
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from detserve.serve.admission import (
    ANSWER_BEFORE_TIMEOUT_S, DecodeCost, Outlook, RequestCost, RetrySlots, Throughput, late_by, open_at,
)  # fmt: skip

#: A size within this share of the cheapest cost per image counts as as cheap (the largest such wins).
#: 15 %, not less, because the figures are noisy and not measured alike. One batch's time varies by 15-20 %
#: here from batch to batch, and a size the policy does not run rests on a few explored batches, each run
#: beside whatever the other lanes run. With 5 %, at 640 px and two lanes, the policy switched among 1, 2
#: and 4 in every c=16 run. Real differences on a GPU are multiples, far above it.
#: The largest, not the smallest: within that noise the figures cannot tell the sizes apart, and under
#: load the bigger batch was the cheaper one (at 640 px on two lanes, batch 8 ran some 8 % cheaper an image
#: than the batches of 1-2 that a flat warm-up curve had chosen; docs/benchmarks.md). A short queue still
#: goes the quickest way (quickest_batch).
COST_TOLERANCE = 0.15
#: One batch in this many tries the next measured size up or down (in turn), when enough images are ready.
EXPLORE_EVERY = 16
#: A size not run for this many batches is not chosen until it runs again. Its figure is from other times
#: (another load, other images), and the current size's figure goes up with whatever else takes the cores: in
#: the overload benchmark's mixed phase (a 64-photo request decoding beside the engine) batch 1 read 40 ms
#: against a stale 2 x 28 ms from warm-up, and the policy switched to pairs that made a one-photo request wait
#: for someone else's image. Neighbours explored every other ``EXPLORE_EVERY`` batches stay fresh.
STALE_AFTER = 4 * EXPLORE_EVERY
#: Admission plans with the median batch time of a size's last this-many batches, not with the EWMA the batch
#: policy uses. The EWMA follows a dip within ten batches, and a dip is what a burst makes: while the replica's
#: own HTTP server takes in 300 connections at once (the HAProxy ingress), its batches ran at about half speed
#: for a second and a half. Planned at that speed, a burst's last third was refused, then all of it was answered
#: in 7 s by the speed that came back. The median of 128 batches ignores such a dip and follows a lasting change
#: within about 64 batches; under a backlog the measured throughput (serve/admission.py) plans instead.
STEADY_BATCHES = 128


class Overloaded(Exception):
    """The request would not be answered in time: answer 503 now, with ``retry_after_s``."""

    def __init__(self, retry_after_s: float, predicted_s: float, budget_s: float, reason: str, hopeless: bool = False):
        super().__init__(reason)
        self.retry_after_s, self.predicted_s, self.budget_s, self.reason = retry_after_s, predicted_s, budget_s, reason
        #: even an idle replica could not answer within this deadline: retrying will not help
        self.hopeless = hopeless


@dataclass
class CostCurve:
    """Seconds per engine batch, by batch size (EWMA of what was measured).

    Measured alone at warm-up (``measure_curve``), then updated by every batch
    the replica runs. Under load the cost per image at each size is not what
    it was alone (lanes share cores, and a bigger batch amortises that
    differently), and only the chosen size runs; so the scheduler also runs a
    neighbouring size now and then (``EXPLORE_EVERY``) to keep every figure current.
    """

    seconds: dict[int, float] = field(default_factory=dict)
    alpha: float = 0.2
    observations: int = 0
    observed_at: dict[int, int] = field(default_factory=dict)  # size -> ``observations`` when it last ran
    recent: dict[int, collections.deque] = field(default_factory=dict)  # size -> its last STEADY_BATCHES batch times

    def __post_init__(self) -> None:
        # A figure set by hand counts as one batch measured.
        for size, seconds in self.seconds.items():
            self.recent.setdefault(size, collections.deque(maxlen=STEADY_BATCHES)).append(seconds)

    def observe(self, size: int, seconds: float) -> None:
        """Fold in one batch: the mean of a size's first ``1 / alpha`` batches, then the EWMA.

        A plain EWMA from the first figure kept a rarely run size near its warm-up figure, measured alone, for
        dozens of its batches; an explored size runs one batch in ``2 * EXPLORE_EVERY``, so its figure under load
        took hundreds of batches to show. The mean lets its first few batches under load count in full.
        """
        old = self.seconds.get(size)
        recent = self.recent.setdefault(size, collections.deque(maxlen=STEADY_BATCHES))
        weight = max(self.alpha, 1 / (len(recent) + 1))  # len(recent): the batches so far (capped far past 1/alpha)
        self.seconds[size] = seconds if old is None else (1 - weight) * old + weight * seconds
        recent.append(seconds)
        self.observations += 1
        self.observed_at[size] = self.observations

    def fresh(self, size: int) -> bool:
        """Measured within the last ``STALE_AFTER`` batches (a figure set by hand counts as fresh)."""
        return self.observations - self.observed_at.get(size, self.observations) <= STALE_AFTER

    def fresh_sizes(self, cap: int | None = None) -> list[int]:
        """The sizes with a fresh figure, up to ``cap``, smallest first."""
        return sorted(s for s in self.seconds if (cap is None or s <= cap) and self.fresh(s))

    def per_image(self, size: int) -> float | None:
        """Seconds per image at ``size``: measured, else the nearest measured size's."""
        if not self.seconds:
            return None
        nearest = min(self.seconds, key=lambda s: (abs(s - size), s))
        return self.seconds[nearest] / nearest

    def steady_per_image(self, size: int) -> float | None:
        """Seconds per image at ``size`` for admission: the median of its recent batches (``STEADY_BATCHES``) once
        there are 8, else :meth:`per_image`."""
        times = self.recent.get(size)
        if not times or len(times) < 8:
            return self.per_image(size)
        return statistics.median_high(times) / size

    def best_batch(self, cap: int, smallest: bool = False) -> int:
        """The batch size with the lowest cost per image, up to ``cap``, of the fresh figures; of the sizes within
        ``COST_TOLERANCE`` of it, the largest (a backlog's throughput), or with ``smallest`` the smallest (latency)."""
        sizes = self.fresh_sizes(cap)
        if not sizes:
            return 1 if not self.seconds else min(cap, max(1, min(self.seconds)))
        cheapest = min(self.seconds[s] / s for s in sizes)
        cheap = [s for s in sizes if self.seconds[s] / s <= cheapest * (1 + COST_TOLERANCE)]
        return cheap[0] if smallest else cheap[-1]

    def batch_seconds(self, size: int) -> float | None:
        """Seconds for one batch of ``size``, from the fresh figures: measured, else interpolated between neighbours,
        else the smallest measured batch's time (below it: a smaller batch costs no more) or the largest's cost per
        image (above it). None with no fresh figure."""
        sizes = self.fresh_sizes()
        if not sizes:
            return None
        if size <= sizes[0]:
            return self.seconds[sizes[0]]
        if size >= sizes[-1]:
            return self.seconds[sizes[-1]] * size / sizes[-1]
        hi = next(s for s in sizes if s >= size)
        lo = max(s for s in sizes if s <= size)
        if lo == hi:
            return self.seconds[lo]
        return self.seconds[lo] + (self.seconds[hi] - self.seconds[lo]) * (size - lo) / (hi - lo)

    def snapshot(self) -> dict[str, float]:
        return {str(s): round(1000 * self.seconds[s] / s, 3) for s in sorted(self.seconds)}


def probe_sizes(cap: int) -> list[int]:
    """Batch sizes measured at warm-up: 1, 2, 4, ... up to ``cap`` (and ``cap`` itself)."""
    sizes, s = [], 1
    while s < cap:
        sizes.append(s)
        s *= 2
    return sizes + [cap]


@dataclass(eq=False)
class Ticket:
    """One admitted request inside the scheduler."""

    n: int
    deadline: float
    params: Any = None
    items: list[Any] = field(default_factory=list)
    results: list[Any] = field(default_factory=list)
    ready: collections.deque = field(default_factory=collections.deque)  # prepared, not yet in a batch
    started: int = 0  # images handed to a batch
    done: int = 0
    closed: bool = False  # finished, failed, timed out or cancelled: nothing more runs for it
    in_line: bool = False  # in one of the scheduler's lines (fresh or served); a closed one is skipped there
    future: asyncio.Future | None = None
    admitted_at: float = 0.0


@dataclass
class Settings:
    max_batch_size: int = 8  # a cap; the cost curve picks the size
    batch_wait_s: float = 0.0  # wait this long for a batch to fill when fewer images than the target are ready
    max_queued_images: int = 1024  # memory bound: admitted images not yet answered, exactly
    lanes: int = 1  # engine calls that may run at once (threads in the engine pool)
    # One more engine call, only for requests with nothing run yet, only while every lane runs a large request's
    # continuing images (the express lane, ``Scheduler._lane``). The executor then needs lanes + 1 threads.
    express: bool = True
    policy: str = "measured"  # "measured": the cheapest size per image up to the cap; "fixed": always aim for the cap
    encode_s: float = 0.05  # reserved before a deadline for encoding and sending the answer
    headroom: float = 0.8  # plan queued work into this share of the time left (the rest absorbs what no curve sees)


class Scheduler:
    """Admission, fair batching and the batch policy for one replica (see the module docstring)."""

    def __init__(
        self,
        run_batch: Callable[[list[Any], list[Any]], list[Any]],
        settings: Settings,
        *,
        executor=None,
        curve: CostCurve | None = None,
        clock: Callable[[], float] = time.monotonic,
    ):
        self.run_batch = run_batch  # (items, params per item) -> result per item (an Exception for a failed item)
        self.settings = settings
        self.executor = executor
        self.curve = curve or CostCurve()
        self.clock = clock
        self.outstanding = 0  # images admitted and not yet answered (decoding, queued or running)
        self.tickets: set[Ticket] = set()
        # Tickets with ready images, in the order of their next turn: those with nothing run yet, in arrival
        # order, ahead of those already served, round-robin (``_join``). Two deques, so that every step is O(1):
        # with 700 requests queued (2x overload, 30 s deadline) scans of one line were 6 % of the replica's
        # Python time.
        self.fresh: collections.deque[Ticket] = collections.deque()
        self.served: collections.deque[Ticket] = collections.deque()
        self._ready = 0  # ready images over all tickets in the lines
        self._waiting = 0  # requests with a ready image (the tickets in the lines, less the released ones there)
        # The admitted tickets' deadlines, soonest and latest first (heaps; released tickets are skipped).
        self._soonest: list[tuple[float, int, Ticket]] = []
        self._latest: list[tuple[float, int, Ticket]] = []
        self._order = itertools.count()
        self.batch_sizes: collections.Counter[int] = collections.Counter()
        self.counts: collections.Counter[str] = collections.Counter()  # admitted, shed, deadline, cancelled
        self.throughput = Throughput()  # images answered per second of backlog (see Calibration above)
        self.decode = DecodeCost()  # decode + prepare seconds per megapixel, by format (admission by pixels)
        self.retry_slots = RetrySlots()
        self._batches = 0
        self._wake: asyncio.Event | None = None
        self._lanes: list[asyncio.Task] = []
        self._express_lane: asyncio.Task | None = None
        self._bulk_running = 0  # lanes (not the express one) running a batch of continuing images only
        self._express_running = False
        self._loop: asyncio.AbstractEventLoop | None = None

    # ---- prediction ------------------------------------------------------
    def target_batch(self) -> int:
        if self.settings.policy == "fixed":
            return self.settings.max_batch_size
        return self.curve.best_batch(self.settings.max_batch_size)

    def next_batch_size(self, target: int) -> int:
        """The size for the next batch: ``target``, or now and then a neighbour, to keep its cost measured."""
        self._batches += 1
        if self.settings.policy == "fixed" or self._batches % EXPLORE_EVERY:
            return target
        sizes = sorted(s for s in self.curve.seconds if s <= self.settings.max_batch_size)
        if target not in sizes or len(sizes) < 2:
            return target
        i = sizes.index(target)
        up = (self._batches // EXPLORE_EVERY) % 2 == 1
        # Up only from a backlog, twice the larger size: then its images would wait about as long in smaller
        # batches anyway. With fewer ready, a bigger batch makes a request that would go next wait for someone
        # else's images: in the overload benchmark's mixed phase (one photo beside a 64-photo request) these
        # batches of 2 were most of the one-photo p99 tail, 80-115 ms against 36.
        if up and i + 1 < len(sizes) and self.ready_images() >= 2 * sizes[i + 1]:
            return sizes[i + 1]
        if not up and i > 0:
            return sizes[i - 1]
        return target

    def batch_size_now(self, target: int) -> int:
        """How many ready images a lane takes now: from a backlog, :meth:`next_batch_size`; from a short queue, the
        quickest way through it.

        A backlog is two batches of ready images from at least as many requests. One large request's images
        are not one: a big batch of them is what a one-photo request arriving behind would wait for (in the
        overload benchmark's mixed phase, batches of 4 of a 64-photo request's images put the one-photo p99
        at +6.7 batch times, against +2 to +4 with the singles of a short queue).

        The cheapest size per image is what a backlog needs (throughput). A short queue is not waiting on
        throughput: what it needs is the soonest answers, and one batch of everything ready is not always that.
        When a pair costs more than 1.5 singles (a CPU, where the cost per image is flat or rises with the batch),
        two ready images are answered sooner on average one after the other, and the one that is ready first
        does not wait for the other. In the overload benchmark's mixed phase the curve chose pairs (batch 1 read
        49 ms an image under the decode of 64 photos, batch 2 38) and a one-photo request rode in a pair with a
        large request's image, 70-110 ms against 36 alone. On a GPU, where a batch of 4 costs about what one
        image does, the same rule takes the whole queue at once.
        """
        size = self.next_batch_size(target)
        ready = self.ready_images()
        if self.settings.policy == "fixed" or ready <= 1 or min(ready, self.waiting_requests()) >= 2 * size:
            return size
        # Not past the smallest size as cheap as any: capped by the backlog's (largest) size instead, a one-photo
        # request rode in batches of 3 with a 64-photo request's images (the mixed phase again, +6.6), since
        # quickest_batch weighs images, not requests.
        return self.quickest_batch(min(ready, size, self.curve.best_batch(self.settings.max_batch_size, smallest=True)))

    def quickest_batch(self, n: int) -> int:
        """The batch size, up to ``n``, that answers ``n`` ready images soonest on average, back to back in one lane.

        A bigger size must be ``COST_TOLERANCE`` quicker to win (the smaller answers its first images sooner).
        """
        if not self.curve.fresh_sizes():
            return n  # nothing measured lately to judge by: all of them, as a plain batch would
        best, best_s = n, math.inf
        for size in range(1, n + 1):
            seconds = self.curve.batch_seconds(size)
            batches = -(-n // size)
            last = n - size * (batches - 1)
            mean_s = seconds * (size * batches * (batches - 1) / 2 + last * batches) / n
            if mean_s < best_s * (1 - COST_TOLERANCE):
                best, best_s = size, mean_s
        return best

    def images_per_s(self) -> float | None:
        """The replica's engine capacity at its target batch size, from the curve's steady figure (``STEADY_BATCHES``)."""
        size = self.target_batch()
        per_image = self.curve.steady_per_image(size)
        return None if not per_image else self.settings.lanes / per_image

    def drain_rate(self) -> float | None:
        """Images per second a queue drains at: what the replica answered over its recent backlog, else the curve's."""
        return self.throughput.images_per_s(self.clock()) or self.images_per_s()

    def predicted_drain_s(self, cost: RequestCost | int | None = None) -> float:
        """Seconds until every admitted image, and ``cost``'s, is answered: the queue at :meth:`drain_rate`, or this
        request's own decode (one image after another) and its last image, if longer."""
        cost = RequestCost(cost) if isinstance(cost, int) else cost or RequestCost(0)
        rate, engine = self.drain_rate(), self.images_per_s()
        queue = (self.outstanding + cost.images) / rate if rate else 0.0
        own = cost.decode_s + (1 / engine if engine and cost.images else 0.0)
        return max(queue, own)

    def alone_s(self, cost: RequestCost) -> float:
        """Seconds ``cost`` takes on an idle replica: its images at the engine's rate, or its own decode and last image."""
        rate = self.images_per_s() or math.inf
        return max(cost.images / rate, cost.decode_s + 1 / rate) + self.settings.encode_s

    def _queue_changed(self) -> None:
        """The queue moved: a backlog starts or ends. A backlog is more images, from more requests, than the lanes
        run at once: one large request alone decodes one image at a time, and its pace is not the replica's."""
        lanes = self.settings.lanes
        self.throughput.backlog(self.clock(), self.outstanding > lanes and len(self.tickets) > lanes)

    def outlook(self, replica: str, server_budget_s: float, wall_offset_s: float = 0.0, max_timeout_s: float = math.inf) -> Outlook:
        """For the ingress (serve/admission.py): from when a one-image request would be admitted, as :meth:`admit`
        rules, if nothing else were admitted meanwhile. Clock times become wall-clock ones by ``wall_offset_s``."""
        now, s = self.clock(), self.settings
        rate = self.images_per_s()
        if rate is None:  # nothing measured: the replica decides
            return Outlook(replica, 0.0, 0.0, 0.0, 0.0, max_timeout_s)
        finish = now + (self.outstanding + 1) / (self.drain_rate() or rate) + s.encode_s
        earliest = self._earliest_deadline()
        at = open_at(now, finish, earliest, server_budget_s, s.headroom)
        if self.outstanding + 1 > s.max_queued_images:
            at = max(at, now + (self.outstanding + 1 - s.max_queued_images) / rate)
        # A client deadline D is admitted (by this report) when finish - now <= headroom * (D - now).
        # A client's timeout T gives the deadline now + T - ANSWER_BEFORE_TIMEOUT_S (request_budget_s).
        need = now + (finish - now) / s.headroom + ANSWER_BEFORE_TIMEOUT_S if s.headroom > 0 else math.inf
        least = self.alone_s(RequestCost(1)) / s.headroom + ANSWER_BEFORE_TIMEOUT_S if s.headroom > 0 else math.inf
        spread = max(1.0, (finish - now) / 2)
        return Outlook(replica, at + wall_offset_s, need + wall_offset_s, least, spread, max_timeout_s)

    # ---- admission -------------------------------------------------------
    def admit(self, cost: RequestCost | int, deadline: float, params: Any = None, budget_s: float | None = None) -> Ticket:
        """Reserve room for a request (its images, and their decode time by their pixels) due by ``deadline``
        (clock time), or raise :class:`Overloaded`.

        ``budget_s``: the whole time the client gave, when part of it went before the replica saw the
        request (the proxy's queue); "hopeless" (a 422) is judged against it, not against what is left.
        """
        cost = RequestCost(cost) if isinstance(cost, int) else cost
        n_images = cost.images
        now = self.clock()
        s = self.settings
        rate = self.images_per_s() or math.inf
        if self.outstanding + n_images > s.max_queued_images:
            excess = self.outstanding + n_images - s.max_queued_images
            self.counts["shed"] += 1
            raise Overloaded(excess / min(rate, 1e9), self.predicted_drain_s(cost), deadline - now,
                             f"{self.outstanding} images are queued; the limit is {s.max_queued_images}")  # fmt: skip
        # Idle, nothing queued: if even then it misses the plan, retrying will not help (a 422).
        alone = self.alone_s(cost)
        budget = deadline - now if budget_s is None else budget_s
        if alone > s.headroom * budget:
            self.counts["shed"] += 1
            raise Overloaded(0.0, alone, deadline - now, self._too_much(cost, alone, budget), hopeless=True)
        earliest, latest = self._deadline_bounds(deadline)
        late = late_by(now, self.predicted_drain_s(cost), earliest, s.headroom, s.encode_s, latest)
        if late is not None:
            self.counts["shed"] += 1
            finish_s, retry_after_s = late
            own_s = n_images / (self.drain_rate() or rate)
            retry_after_s = self.retry_slots.book(now, retry_after_s, own_s, deadline - now)
            raise Overloaded(retry_after_s, finish_s, deadline - now,
                             f"the {self.outstanding} images queued ahead would take {finish_s:.1f} s, "
                             f"past the deadline {earliest - now:.1f} s away")  # fmt: skip
        ticket = Ticket(n=n_images, deadline=deadline, params=params, items=[None] * n_images, results=[None] * n_images,
                        admitted_at=now)  # fmt: skip
        self.outstanding += n_images
        self.tickets.add(ticket)
        self._queue_changed()
        order = next(self._order)
        heapq.heappush(self._soonest, (deadline, order, ticket))
        heapq.heappush(self._latest, (-deadline, order, ticket))
        self.counts["admitted"] += 1
        return ticket

    def _too_much(self, cost: RequestCost, alone_s: float, budget_s: float) -> str:
        """Why a request is hopeless, in the numbers it sent: its images and pixels, against its deadline."""
        what = f"{cost.images} image{'s' if cost.images != 1 else ''}"
        if cost.pixels:
            what += f" ({cost.pixels / 1e6:.0f} megapixels, about {cost.decode_s:.1f} s to decode one after another)"
        return (f"{what} take about {alone_s:.2f} s here even with nothing queued, more than "
                f"{self.settings.headroom:.0%} of the {max(0.0, budget_s):.2f} s this request has")

    def _deadline_bounds(self, deadline: float) -> tuple[float, float]:
        """The earliest and the latest deadline among the admitted tickets and ``deadline``."""
        for heap in (self._soonest, self._latest):
            while heap and heap[0][2].closed:
                heapq.heappop(heap)
        earliest = min(deadline, self._soonest[0][0]) if self._soonest else deadline
        latest = max(deadline, -self._latest[0][0]) if self._latest else deadline
        return earliest, latest

    def _earliest_deadline(self) -> float:
        """The earliest deadline among the admitted tickets (inf with none)."""
        while self._soonest and self._soonest[0][2].closed:
            heapq.heappop(self._soonest)
        return self._soonest[0][0] if self._soonest else math.inf

    def add(self, ticket: Ticket, index: int, item: Any) -> None:
        """Image ``index`` of ``ticket`` is prepared: it may join the next batch."""
        if ticket.closed:
            return
        ticket.items[index] = item
        ticket.ready.append(index)
        self._ready += 1
        if not ticket.in_line:
            self._join(ticket)
        self._ensure_lanes()
        assert self._wake is not None
        self._wake.set()

    def _join(self, ticket: Ticket) -> None:
        """Put a ticket with a ready image in the line: one with nothing run yet goes ahead of those already served.

        Plain round-robin put a one-photo request behind a large request whose next photo became ready while
        the lane ran its last one, so it waited for two of them (one in flight, one ahead). Now it waits for
        the one in flight only. Newcomers keep their arrival order among themselves, and a large request
        still gets every turn that no newcomer is waiting for; admission already plans for all the queued
        work being done before the earliest deadline, whatever the order, so it still finishes in time.
        """
        ticket.in_line = True
        self._waiting += 1
        (self.served if ticket.started else self.fresh).append(ticket)

    async def wait(self, ticket: Ticket) -> list[Any]:
        """The results of every image of ``ticket``, in input order (the caller bounds it by the deadline)."""
        if ticket.future is None:
            ticket.future = asyncio.get_running_loop().create_future()
            if ticket.done == ticket.n:
                ticket.future.set_result(ticket.results)
        return await asyncio.shield(ticket.future)

    def release(self, ticket: Ticket, reason: str | None = None) -> None:
        """The request is over: answered, failed, or (``reason``) "deadline" or "cancelled". Drop what has not started."""
        if ticket.closed:
            return
        ticket.closed = True
        if reason:
            self.counts[reason] += 1
        # Images never handed to a batch leave now; those in a batch leave when it ends (_finish).
        self.outstanding -= ticket.n - ticket.started
        self._ready -= len(ticket.ready)
        if ticket.ready:
            self._waiting -= 1
        ticket.ready.clear()  # it stays in its line, closed, until a lane passes it (take_batch)
        self.tickets.discard(ticket)
        self._queue_changed()
        if ticket.future is not None and not ticket.future.done():
            ticket.future.cancel()

    # ---- batching --------------------------------------------------------
    def take_batch(self, size: int, fresh_only: bool = False) -> list[tuple[Ticket, int]]:
        """Up to ``size`` ready images, one from each request in turn: new requests first, then round-robin.

        ``fresh_only``: from requests with nothing run yet only (the express lane).
        """
        batch: list[tuple[Ticket, int]] = []
        while len(batch) < size and (self.fresh or (self.served and not fresh_only)):
            ticket = (self.fresh or self.served).popleft()
            if not ticket.ready:  # released while in line
                ticket.in_line = False
                continue
            batch.append((ticket, ticket.ready.popleft()))
            self._ready -= 1
            ticket.started += 1
            if ticket.ready:
                self.served.append(ticket)  # back of the line: the next request goes first
            else:
                ticket.in_line = False
                self._waiting -= 1
        return batch

    def ready_images(self) -> int:
        return self._ready

    def express_due(self) -> bool:
        """Whether the express lane should run now: every lane is on bulk work and a new request has an image ready."""
        return self.settings.express and self._bulk_running >= self.settings.lanes and self._fresh_waiting()

    def _bulk_held(self) -> bool:
        """While an express batch runs, a lane starts no new bulk batch: the small one gets the cores."""
        return self._express_running and not self._fresh_waiting()

    def _fresh_waiting(self) -> bool:
        """Whether a request with nothing run yet has an image ready (the fresh line, less released tickets)."""
        while self.fresh and not self.fresh[0].ready:  # released while in line
            self.fresh.popleft().in_line = False
        return bool(self.fresh)

    def waiting_requests(self) -> int:
        """Requests with at least one image ready."""
        return self._waiting

    def _ensure_lanes(self) -> None:
        loop = asyncio.get_running_loop()
        if self._wake is None or self._loop is not loop:  # a replica has one loop; tests may bring several
            self._wake, self._loop, self._lanes, self._express_lane = asyncio.Event(), loop, [], None
        self._lanes = [task for task in self._lanes if not task.done()]
        while len(self._lanes) < self.settings.lanes:
            self._lanes.append(loop.create_task(self._lane()))
        if self.settings.express and (self._express_lane is None or self._express_lane.done()):
            self._express_lane = loop.create_task(self._lane(express=True))

    async def _lane(self, express: bool = False) -> None:
        loop = asyncio.get_running_loop()
        assert self._wake is not None
        while True:
            while not (self.express_due() if express else self._ready and not self._bulk_held()):
                self._wake.clear()
                await self._wake.wait()
            target = self.target_batch()
            if not express and self.settings.batch_wait_s > 0 and self.ready_images() < target:
                await asyncio.sleep(self.settings.batch_wait_s)  # let a GPU batch fill
            # Bulk: no new request is waiting, so every image this lane takes is a continuing one. The express
            # lane may run beside it.
            bulk = not express and not self._fresh_waiting()
            batch = self.take_batch(self.batch_size_now(target), fresh_only=express)
            if not batch:
                continue
            if bulk:
                self._bulk_running += 1
                self._wake.set()  # the express lane looks again
            if express:
                self._express_running = True
            items = [t.items[i] for t, i in batch]
            params = [t.params for t, _ in batch]
            start = self.clock()
            try:
                results = await loop.run_in_executor(self.executor, self.run_batch, items, params)
            except Exception as exc:  # run_batch isolates failures per item; this is a bug guard
                results = [exc] * len(batch)
            finally:
                if bulk:
                    self._bulk_running -= 1
                if express:
                    self._express_running = False
                    self._wake.set()  # bulk work held back meanwhile may go on
            self.curve.observe(len(batch), self.clock() - start)
            self.throughput.finished(self.clock(), len(batch))
            self.batch_sizes[len(batch)] += 1
            for (ticket, index), result in zip(batch, results):
                self._finish(ticket, index, result)

    def _finish(self, ticket: Ticket, index: int, result: Any) -> None:
        self.outstanding -= 1  # every image handed to a batch is counted out here, once
        self._queue_changed()
        ticket.results[index] = result
        ticket.done += 1
        if ticket.closed or ticket.done < ticket.n:
            return
        if ticket.future is None:
            ticket.future = asyncio.get_running_loop().create_future()
        if not ticket.future.done():
            ticket.future.set_result(ticket.results)

    # ---- what /stats shows -------------------------------------------------
    def stats(self) -> dict:
        rate = self.images_per_s()
        measured = self.throughput.images_per_s(self.clock())
        return {
            "outstanding_images": self.outstanding,
            "ready_images": self.ready_images(),
            "requests": len(self.tickets),
            "target_batch_size": self.target_batch(),
            "max_batch_size": self.settings.max_batch_size,
            "lanes": self.settings.lanes,
            "ms_per_image_by_batch": self.curve.snapshot(),
            "images_per_s": None if rate is None else round(rate, 2),
            "predicted_drain_s": round(self.predicted_drain_s(), 3),
            "measured_images_per_s": None if measured is None else round(measured, 2),
            "decode_ms_per_mp": {fmt: round(1000 * v, 2) for fmt, v in sorted(self.decode.s_per_mp.items())},
            "counts": dict(self.counts),
        }


def measure_curve(run: Callable[[int], None], sizes: Sequence[int], repeats: int = 2, clock: Callable[[], float] = time.perf_counter) -> CostCurve:
    """Time ``run(size)`` (one engine batch of ``size`` images) for each size; the fastest of ``repeats``."""
    curve = CostCurve()
    for size in sizes:
        best = math.inf
        for _ in range(repeats):
            start = clock()
            run(size)
            best = min(best, clock() - start)
        curve.observe(size, best)
    return curve
