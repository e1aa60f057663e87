"""The replica's scheduler without Ray: batch policy, admission by deadline, fairness, dropping what nobody waits for."""

from __future__ import annotations

import asyncio
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from detserve.serve.admission import RetrySlots, late_by, retry_after_header
from detserve.serve.scheduler import CostCurve, Overloaded, Scheduler, Settings, measure_curve, probe_sizes


def curve_of(per_image_ms: dict[int, float]) -> CostCurve:
    return CostCurve({size: size * ms / 1000 for size, ms in per_image_ms.items()})


def test_batch_policy_follows_the_measured_cost_per_image():
    # CPU at 640 px: activations outgrow the cache, so a bigger batch costs more per image.
    # 4 and 8 are clearly dearer (25 % and more); 2 is within the figures' noise of 1 (7 %).
    assert curve_of({1: 56, 2: 60, 4: 70, 8: 80}).best_batch(8) == 2
    assert curve_of({1: 56, 2: 66, 4: 70, 8: 80}).best_batch(8) == 1
    # GPU: a bigger batch costs less per image.
    assert curve_of({1: 5, 2: 3, 4: 1.5, 8: 0.8, 16: 0.5}).best_batch(16) == 16
    assert curve_of({1: 5, 2: 3, 4: 1.5, 8: 0.8, 16: 0.5}).best_batch(8) == 8  # the cap is a cap
    # Flat within 15 % (the noise of the figures): the largest, for a backlog's throughput.
    assert curve_of({1: 20.0, 2: 19.5, 4: 19.2, 8: 19.9}).best_batch(8) == 8
    assert curve_of({1: 20.0, 2: 15.0, 4: 14.8, 8: 14.5}).best_batch(8) == 8
    assert curve_of({1: 20.0, 2: 15.0, 4: 14.8, 8: 19.0}).best_batch(8) == 4  # 8 is 28 % dearer than 4: out
    assert curve_of({1: 17.6, 2: 18.0, 4: 20.0}).best_batch(8) == 4  # 4 is 14 % dearer than 1: within the noise
    assert probe_sizes(8) == [1, 2, 4, 8] and probe_sizes(6) == [1, 2, 4, 6] and probe_sizes(1) == [1]


def test_measure_curve_times_each_size_and_every_batch_updates_it():
    calls = []
    curve = measure_curve(lambda n: calls.append(n) or time.sleep(0.002 * n), [1, 2, 4], repeats=2)
    assert calls == [1, 1, 2, 2, 4, 4]
    assert set(curve.seconds) == {1, 2, 4}
    assert 0.002 <= curve.per_image(4) < 0.02
    before = curve.seconds[4]
    curve.observe(4, before * 11)  # one slow batch moves it, does not replace it
    assert curve.seconds[4] == pytest.approx(before * 6)  # the mean of the two
    for _ in range(3):  # the first batches under load count in full: the mean of all five ...
        curve.observe(4, before * 11)
    assert curve.seconds[4] == pytest.approx(before * 9)
    curve.observe(4, before)  # ... then the EWMA: a batch's weight stays at alpha
    assert curve.seconds[4] == pytest.approx(0.8 * before * 9 + 0.2 * before)


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_admission_by_predicted_drain_time_with_a_computed_retry_after():
    clock = FakeClock()
    # 100 ms per image, one lane: 10 images/s.
    sched = Scheduler(lambda items, params: items, Settings(lanes=1, encode_s=0.0, headroom=1.0), curve=curve_of({1: 100}), clock=clock)
    deadline = clock.now + 3.0
    tickets = [sched.admit(1, deadline) for _ in range(30)]  # 30 images drain in exactly 3.0 s
    assert sched.outstanding == 30 and sched.predicted_drain_s() == pytest.approx(3.0)
    with pytest.raises(Overloaded) as err:
        sched.admit(5, clock.now + 10.0)  # its own deadline is far, but it would make the earliest one late
    assert err.value.retry_after_s == pytest.approx(0.5) and not err.value.hopeless
    assert retry_after_header(err.value.retry_after_s) == "1" and retry_after_header(2.01) == "3"
    for t in tickets[:10]:
        sched.release(t)  # one second of work gone: room again
    assert sched.admit(5, clock.now + 10.0).n == 5
    # A deadline nothing could meet is told apart: retrying will not help.
    with pytest.raises(Overloaded) as err:
        sched.admit(20, clock.now + 1.0)
    assert err.value.hopeless
    assert sched.counts["admitted"] == 31 and sched.counts["shed"] == 2


def test_retry_after_is_at_most_the_last_queued_deadline():
    """A slowed rate (the burst's dip) must not send clients away for longer than the queue can last."""
    now = 1000.0
    # 300 images at 10/s is 30 s, but every queued request is answered or dropped within 4 s.
    predicted, retry = late_by(now, 30.0, now + 2.0, 1.0, 0.0, latest_deadline=now + 4.0)
    assert predicted == pytest.approx(30.0) and retry == pytest.approx(4.0)
    assert late_by(now, 30.0, now + 2.0, 1.0, 0.0)[1] == pytest.approx(28.0)  # no bound given: the drain alone
    assert late_by(now, 1.0, now + 2.0, 1.0, 0.0, latest_deadline=now + 4.0) is None

    clock = FakeClock()
    sched = Scheduler(lambda items, params: items, Settings(lanes=1, encode_s=0.0, headroom=1.0), curve=curve_of({1: 100}), clock=clock)
    sched.admit(30, clock.now + 3.0)
    sched.drain_rate = lambda: 2.5  # the rate fell to a quarter after the queue was admitted: it now drains in 12 s
    with pytest.raises(Overloaded) as err:
        sched.admit(1, clock.now + 3.0)
    assert err.value.retry_after_s == pytest.approx(3.0)


def test_refusals_book_retry_slots_at_the_service_rate_within_one_budget():
    slots = RetrySlots()
    # 10 images/s: each one-image refusal comes back 0.1 s after the one before, none before its own 0.5 s.
    waits = [slots.book(100.0, 0.5, 0.1, horizon_s=2.0) for _ in range(30)]
    assert waits[:3] == pytest.approx([0.5, 0.6, 0.7]) and waits[20] == pytest.approx(2.5)
    assert max(waits) == pytest.approx(2.5)  # never past its own Retry-After plus one budget
    assert slots.book(110.0, 0.5, 0.4, horizon_s=2.0) == pytest.approx(0.5)  # the line has passed: its own again
    assert slots.book(110.0, 0.0, 0.1, horizon_s=2.0) == pytest.approx(0.9)  # after the 4-image slot


def test_the_queue_bound_holds_exactly():
    sched = Scheduler(lambda items, params: items, Settings(max_queued_images=10), curve=curve_of({1: 1}))
    far = time.monotonic() + 3600
    sched.admit(7, far)
    sched.admit(3, far)
    assert sched.outstanding == 10
    with pytest.raises(Overloaded, match="limit is 10"):
        sched.admit(1, far)


class SteppedEngine:
    """A fake engine that finishes a batch only when the test releases it: which images ran in which batch, and how
    many batches ran at once, are counted, never timed (the machine is shared; a clock would only test its load)."""

    def __init__(self, auto: bool = False) -> None:
        self.batches: list[list[tuple[str, int]]] = []  # in the order they started
        self.running: set[int] = set()
        self.released: set[int] = set()
        self.most_at_once = 0
        self.auto = auto  # release every batch at once
        self.cv = threading.Condition()

    def __call__(self, items, params):
        with self.cv:
            k = len(self.batches)
            self.batches.append(list(items))
            self.running.add(k)
            self.most_at_once = max(self.most_at_once, len(self.running))
            assert self.cv.wait_for(lambda: self.auto or k in self.released, timeout=20), f"batch {k} never released"
            self.running.discard(k)
        return [f"{name}:{i}" for name, i in items]

    def release(self, *batches: int) -> None:
        with self.cv:
            self.released.update(batches)
            self.cv.notify_all()

    def release_all(self) -> None:
        with self.cv:
            self.auto = True
            self.cv.notify_all()

    def started(self) -> int:
        with self.cv:
            return len(self.batches)


async def until(condition, what: str = "") -> None:
    """Wait (bounded) for the scheduler's threads and tasks to reach a state: a wait for an event, not a timing."""
    for _ in range(4000):
        if condition():
            return
        await asyncio.sleep(0.005)
    raise AssertionError(f"never happened: {what}")


async def submit(sched: Scheduler, name: str, n: int, deadline_s: float = 600.0) -> list:
    ticket = sched.admit(n, time.monotonic() + deadline_s)
    try:
        for i in range(n):
            sched.add(ticket, i, (name, i))
        return await sched.wait(ticket)
    finally:
        sched.release(ticket)


async def step(engine: SteppedEngine, batch: int) -> None:
    """Let batch ``batch`` finish, and wait for the next one to start."""
    engine.release(batch)
    await until(lambda: engine.started() > batch + 1, f"batch {batch + 1} starts")


def test_a_small_request_is_not_starved_by_a_large_one_and_results_stay_in_order():
    engine = SteppedEngine()

    async def main():
        with ThreadPoolExecutor(1) as pool:  # no express lane: fresh-first order alone
            sched = Scheduler(engine, Settings(max_batch_size=2, lanes=1, express=False), executor=pool, curve=curve_of({2: 20}))
            big = asyncio.create_task(submit(sched, "big", 64))
            await until(lambda: engine.started() == 1)
            for k in range(3):
                await step(engine, k)  # the big request is well under way: batch 3 in flight
            small = asyncio.create_task(submit(sched, "small", 1))
            await until(lambda: sched.ready_images() > 0 and any(t.n == 1 for t in sched.fresh))
            await step(engine, 3)
            first_after = engine.batches[4]
            engine.release_all()
            return first_after, await small, await big, sched

    first_after, small_results, big_results, sched = asyncio.run(main())
    assert small_results == ["small:0"]
    assert big_results == [f"big:{i}" for i in range(64)]  # whole and in input order, over many batches
    # It waited for the batch in flight only, and rode in the next one beside one of the big request's images.
    assert ("small", 0) in first_after and len(first_after) == 2
    assert sched.outstanding == 0 and not sched.tickets


def test_the_express_lane_runs_a_new_request_beside_a_large_requests_batch_and_never_under_small_requests():
    engine = SteppedEngine()

    async def main():
        with ThreadPoolExecutor(2) as pool:  # lanes + 1 threads
            sched = Scheduler(engine, Settings(max_batch_size=1, lanes=1), executor=pool, curve=curve_of({1: 60}))
            big = asyncio.create_task(submit(sched, "big", 12))
            await until(lambda: engine.started() == 1)
            await step(engine, 0)  # batch 1: the big request's continuing (bulk) work
            small = asyncio.create_task(submit(sched, "small", 1))
            # The express lane runs it at once, beside the big image in flight: no wait for that batch.
            await until(lambda: engine.started() == 3, "the express batch starts")
            express = engine.batches[2]
            at_once = engine.most_at_once
            # While the express batch runs, no new bulk batch starts: the big batch ends, and nothing follows it.
            engine.release(1)
            big_ticket = next(t for t in sched.tickets if t.n == 12)
            await until(lambda: big_ticket.done == 2, "the big batch is answered")
            held = engine.started()
            engine.release(2)
            await until(lambda: engine.started() == 4, "bulk work goes on")
            engine.release_all()
            return express, at_once, held, await small, await big, sched

    express, at_once, held, small_results, big_results, sched = asyncio.run(main())
    assert express == [("small", 0)] and at_once == 2 and held == 3
    assert small_results == ["small:0"] and big_results == [f"big:{i}" for i in range(12)]
    assert sched.outstanding == 0

    # Small requests alone are never bulk work: one engine call at a time, as many as the lanes.
    engine = SteppedEngine(auto=True)

    async def small_load():
        with ThreadPoolExecutor(2) as pool:
            sched = Scheduler(engine, Settings(max_batch_size=1, lanes=1), executor=pool, curve=curve_of({1: 20}))
            await asyncio.gather(*(submit(sched, f"r{i}", 1) for i in range(10)), submit(sched, "pair", 2))

    asyncio.run(small_load())
    assert engine.most_at_once == 1 and len(engine.batches) == 12


def test_images_of_a_released_request_are_dropped_not_run():
    engine = SteppedEngine()

    async def main():
        with ThreadPoolExecutor(1) as pool:
            sched = Scheduler(engine, Settings(max_batch_size=1, lanes=1), executor=pool, curve=curve_of({1: 30}))
            ticket = sched.admit(20, time.monotonic() + 60)
            for i in range(20):
                sched.add(ticket, i, ("gone", i))
            await until(lambda: engine.started() == 1)
            await step(engine, 0)  # two images have started
            sched.release(ticket, "cancelled")  # the client went away
            engine.release_all()
            await until(lambda: sched.outstanding == 0, "the batch in flight ends")
            return sched

    sched = asyncio.run(main())
    assert engine.batches == [[("gone", 0)], [("gone", 1)]]  # the other 18 never ran
    assert sched.counts["cancelled"] == 1


def test_lanes_run_batches_at_once():
    engine = SteppedEngine()

    async def main():
        with ThreadPoolExecutor(2) as pool:
            sched = Scheduler(engine, Settings(max_batch_size=1, lanes=2, express=False), executor=pool, curve=curve_of({1: 50}))
            requests = asyncio.gather(*(submit(sched, f"r{i}", 1) for i in range(8)))
            await until(lambda: engine.started() == 2, "both lanes run")
            engine.release_all()
            return await requests

    results = asyncio.run(main())
    assert engine.most_at_once == 2 and len(engine.batches) == 8 and results == [[f"r{i}:0"] for i in range(8)]


def test_a_backlog_is_planned_at_the_rate_the_replica_really_answers():
    clock = FakeClock()
    # The curve says 100 ms per image; under load (decode, contention) the replica answers 5 images/s, not 10.
    sched = Scheduler(lambda items, params: items, Settings(lanes=1, encode_s=0.0, headroom=1.0), curve=curve_of({1: 100}), clock=clock)
    tickets = [sched.admit(1, clock.now + 60) for _ in range(50)]
    assert sched.predicted_drain_s() == pytest.approx(5.0)  # nothing measured yet: the curve
    for ticket in tickets[:40]:  # a backlog throughout: one image every 0.2 s
        clock.now += 0.2
        sched.throughput.finished(clock.now, 1)
        sched.release(ticket)
        if ticket is tickets[18]:  # 19 images over 3.8 s: too few to go by
            assert sched.throughput.images_per_s(clock.now) is None
    assert sched.throughput.images_per_s(clock.now) == pytest.approx(5.0)
    assert sched.predicted_drain_s() == pytest.approx(10 / 5.0) and sched.predicted_drain_s(5) == pytest.approx(15 / 5.0)
    # Fewer are admitted: 3 s before the earliest deadline now holds 15 images in all, not 30.
    deadline = clock.now + 3.01
    with pytest.raises(Overloaded):
        while True:
            sched.admit(1, deadline)
    assert sched.outstanding == 15
    # An idle request is judged hopeless by the engine alone, not by the measured rate (a 422 must mean "never").
    with pytest.raises(Overloaded) as err:
        sched.admit(3, clock.now + 0.35)
    assert not err.value.hopeless  # 0.3 s alone fits; it is the queue that says "not now"
    # A measurement goes stale: without a backlog for THROUGHPUT_FRESH_S, the curve plans again.
    from detserve.serve.admission import THROUGHPUT_FRESH_S

    clock.now += THROUGHPUT_FRESH_S + 0.1
    assert sched.throughput.images_per_s(clock.now) is None and sched.predicted_drain_s() == pytest.approx(sched.outstanding * 0.1)


def test_one_large_request_alone_is_not_a_backlog():
    """Its images decode one after another: its pace is not what the replica can do for others."""
    clock = FakeClock()
    sched = Scheduler(lambda items, params: items, Settings(lanes=1, encode_s=0.0), curve=curve_of({1: 100}), clock=clock)
    sched.admit(64, clock.now + 60)
    assert sched.throughput.busy_since is None
    sched.admit(1, clock.now + 60)
    assert sched.throughput.busy_since == clock.now


def test_only_time_with_a_backlog_counts_towards_throughput():
    """One request at a time measures its own latency (decode, hop, encode), not what the replica can do: not counted."""
    from detserve.serve.admission import Throughput

    t = Throughput()
    for i in range(20):  # a lone request every second, each taking 0.3 s
        t.backlog(i, False)
        t.finished(i + 0.3, 1)
    assert t.images_per_s(20.0) is None and t.busy_s == 0.0
    t.backlog(30.0, True)
    for k in range(1, 51):
        t.finished(30.0 + 0.1 * k, 2)  # 20 images/s while backlogged
    t.backlog(35.0, False)
    assert t.images_per_s(35.1) == pytest.approx(20.0)
    t.backlog(38.0, True)  # a new backlog, three seconds later: the idle time between does not count
    t.finished(38.5, 10)
    assert t.images_per_s(38.5) == pytest.approx((100 + 10) / (5.0 + 0.5), rel=0.01)


def test_headroom_keeps_part_of_the_time_left_for_what_the_curve_does_not_see():
    clock = FakeClock()
    sched = Scheduler(lambda items, params: items, Settings(lanes=1, encode_s=0.0, headroom=0.8), curve=curve_of({1: 100}), clock=clock)
    admitted: list = []
    with pytest.raises(Overloaded):
        while True:
            admitted.append(sched.admit(1, clock.now + 3.0))
    assert len(admitted) == 24  # 30 would fit 3.0 s exactly; 80 % of it is planned


def test_the_policy_explores_neighbours_and_follows_a_curve_that_changes_under_load():
    """Alone, batch 1 is cheapest; under load batch 4 becomes cheaper. Only exploring finds that out."""
    from detserve.serve import scheduler as sched_mod

    cost = {"per_image": {1: 0.048, 2: 0.052, 4: 0.065, 8: 0.061}}  # alone (warm-up)
    sched = Scheduler(lambda items, params: items, Settings(max_batch_size=8, lanes=1), curve=curve_of({1: 48, 2: 52, 4: 65, 8: 61}))
    sched.ready_images = lambda: 100  # a busy replica: always enough ready images
    cost["per_image"] = {1: 0.090, 2: 0.080, 4: 0.050, 8: 0.070}  # under load
    sizes = []
    for _ in range(40 * sched_mod.EXPLORE_EVERY):
        size = sched.next_batch_size(sched.target_batch())
        sizes.append(size)
        sched.curve.observe(size, size * cost["per_image"][size])
    assert sched.target_batch() == 4
    assert sizes[-sched_mod.EXPLORE_EVERY:].count(4) >= sched_mod.EXPLORE_EVERY - 1  # settled, exploring rarely
    fixed = Scheduler(lambda items, params: items, Settings(max_batch_size=8, policy="fixed"), curve=curve_of({1: 48}))
    assert {fixed.next_batch_size(fixed.target_batch()) for _ in range(100)} == {8}


def test_a_cold_burst_is_admitted_at_the_engines_rate_until_the_replica_has_measured_itself():
    """Before any backlog has been measured the cost curve plans: a burst's first answers, each late by the arrivals
    around it (a fixed delay), do not read as a slower rate and do not shut the rest of the burst out."""
    clock = FakeClock()
    sched = Scheduler(lambda items, params: items, Settings(lanes=1, encode_s=0.0, headroom=0.8), curve=curve_of({1: 25}), clock=clock)
    deadline = clock.now + 30.0
    tickets = [sched.admit(1, deadline) for _ in range(300)]  # 7.5 s at 40/s: within 0.8 x 30 s
    assert len(tickets) == 300 and sched.predicted_drain_s() == pytest.approx(7.5)
    # Measured under the burst at half the curve's rate: 15 s for the 300, still within the plan.
    for ticket in tickets[:100]:
        clock.now += 0.05
        sched.throughput.finished(clock.now, 1)
        sched.release(ticket)
    assert sched.predicted_drain_s() == pytest.approx(200 / 20.0)


def test_a_short_queue_goes_the_quickest_way_and_a_backlog_the_cheapest():
    # Under a 64-photo request's decode, batch 1 read 49 ms an image and batch 2 38: the curve's choice is 2.
    cpu = Scheduler(lambda items, params: items, Settings(max_batch_size=8, lanes=1), curve=curve_of({1: 49, 2: 38}))
    assert cpu.target_batch() == 2
    cpu.ready_images = lambda: 2  # one photo of a small request, one of the large one
    # A pair (76 ms) answers them later on average than two singles (49 and 98 ms): one at a time.
    assert cpu.batch_size_now(cpu.target_batch()) == 1
    cpu.ready_images = cpu.waiting_requests = lambda: 40  # a backlog: throughput decides, the cheapest per image
    assert cpu.batch_size_now(cpu.target_batch()) == 2
    # A GPU-like curve, a batch of 4 costs little more than 1: a short queue is taken whole.
    gpu = Scheduler(lambda items, params: items, Settings(max_batch_size=8, lanes=1), curve=curve_of({1: 10, 2: 5.5, 4: 3, 8: 1.6}))
    assert gpu.target_batch() == 8
    gpu.ready_images = lambda: 3
    assert gpu.batch_size_now(gpu.target_batch()) == 3
    gpu.ready_images = lambda: 7
    assert gpu.batch_size_now(gpu.target_batch()) == 7
    assert gpu.quickest_batch(7) == 7 and cpu.quickest_batch(2) == 1


def test_a_size_not_run_for_a_while_is_not_chosen_on_its_old_figure():
    from detserve.serve import scheduler as sched_mod

    curve = CostCurve()
    for size, ms in ((1, 30), (2, 50)):  # warm-up: a pair is cheaper per image
        curve.observe(size, ms / 1000)
    assert curve.best_batch(8) == 2
    for _ in range(sched_mod.STALE_AFTER + 1):  # then only singles run, slower now (other work on the cores)
        curve.observe(1, 0.040)
    assert not curve.fresh(2) and curve.best_batch(8) == 1  # 25 ms from warm-up against 40 now: not comparable
    curve.observe(2, 0.064)  # measured again now: 32 an image, cheaper than 40
    assert curve.best_batch(8) == 2


def test_exploring_a_bigger_batch_waits_for_a_backlog():
    from detserve.serve import scheduler as sched_mod

    sched = Scheduler(lambda items, params: items, Settings(max_batch_size=8, lanes=1), curve=curve_of({1: 30, 2: 31}))
    sched.ready_images = lambda: 3  # fewer than two batches of 2: a pair would make the first image wait
    assert {sched.next_batch_size(1) for _ in range(4 * sched_mod.EXPLORE_EVERY)} == {1}
    sched.ready_images = lambda: 4
    assert 2 in {sched.next_batch_size(1) for _ in range(4 * sched_mod.EXPLORE_EVERY)}


def test_a_newcomer_waits_only_for_the_batch_in_flight():
    """Round-robin alone put a one-photo request behind the large one's next photo too: two batches, not one."""
    engine = SteppedEngine()

    async def main():
        with ThreadPoolExecutor(1) as pool:
            sched = Scheduler(engine, Settings(max_batch_size=1, lanes=1, express=False), executor=pool, curve=curve_of({1: 30}))
            big = asyncio.create_task(submit(sched, "big", 12))  # all 12 ready: the large request always has one waiting
            await until(lambda: engine.started() == 1)
            await step(engine, 0)
            await step(engine, 1)  # batch 2 in flight
            small = asyncio.create_task(submit(sched, "small", 1))
            await until(lambda: any(t.n == 1 for t in sched.fresh))
            await step(engine, 2)
            engine.release_all()
            return await small, await big

    small_results, big_results = asyncio.run(main())
    assert small_results == ["small:0"] and big_results == [f"big:{i}" for i in range(12)]
    assert engine.batches[3] == [("small", 0)]  # the very next batch after the one that was running


def test_admission_plans_with_the_steady_figure_a_burst_dip_does_not_move():
    from detserve.serve import scheduler as sched_mod

    sched = Scheduler(lambda items, params: items, Settings(max_batch_size=1, lanes=1), curve=CostCurve())
    for _ in range(sched_mod.STEADY_BATCHES):
        sched.curve.observe(1, 0.030)
    assert sched.images_per_s() == pytest.approx(1 / 0.030)
    for _ in range(40):  # a burst's intake: batches at half speed for a while
        sched.curve.observe(1, 0.060)
    assert sched.curve.per_image(1) > 0.059  # the EWMA (the batch policy's figure) has followed the dip ...
    assert sched.images_per_s() == pytest.approx(1 / 0.030)  # ... admission's has not: the dip is not the drain rate
    for _ in range(sched_mod.STEADY_BATCHES // 2):  # a lasting change: now most of the recent batches
        sched.curve.observe(1, 0.060)
    assert sched.images_per_s() == pytest.approx(1 / 0.060)


def test_the_lines_new_requests_first_then_round_robin_released_ones_skipped():
    # The order of turns, step by step (no lane runs: this test takes the batches), and the O(1) bookkeeping behind it.
    async def main():
        sched = Scheduler(lambda items, params: items, Settings(max_batch_size=8, lanes=1), curve=curve_of({1: 1}))
        sched._wake = asyncio.Event()
        sched._ensure_lanes = lambda: None
        now = time.monotonic()
        a, b = sched.admit(3, now + 30), sched.admit(1, now + 10)
        for i in range(3):
            sched.add(a, i, ("a", i))
        assert [(t, i) for t, i in sched.take_batch(1)] == [(a, 0)]  # arrival order among new requests
        sched.add(b, 0, ("b", 0))
        c = sched.admit(1, now + 20)
        sched.add(c, 0, ("c", 0))
        # b and c have nothing run yet: both go ahead of a, which was served already.
        assert sched.take_batch(3) == [(b, 0), (c, 0), (a, 1)]
        d = sched.admit(2, now + 5)
        sched.add(d, 0, ("d", 0))
        sched.add(d, 1, ("d", 1))
        assert sched.ready_images() == 3 == sum(len(t.ready) for t in (a, b, c, d)) and sched.waiting_requests() == 2
        assert sched._deadline_bounds(now + 60) == (now + 5, now + 60)
        sched.release(d, "cancelled")  # in line, released: its turn is skipped, its images are gone
        assert sched.ready_images() == 1 and sched.waiting_requests() == 1
        assert sched.take_batch(8) == [(a, 2)] and sched.ready_images() == 0 == sched.waiting_requests()
        assert not sched.fresh and not sched.served
        for t in (a, b, c):
            sched.release(t)
        assert sched._deadline_bounds(now + 60) == (now + 60, now + 60)  # released deadlines no longer count

    asyncio.run(main())


def test_a_backlog_takes_the_largest_cheap_size_and_a_short_queue_no_more_than_the_smallest():
    # Flat within the noise: from a backlog the largest (throughput); a short queue is capped by the smallest
    # cheap size, so a one-photo request does not ride in a batch of a large request's photos.
    sched = Scheduler(lambda items, params: items, Settings(max_batch_size=8, lanes=1), curve=curve_of({1: 20, 2: 19, 4: 18.5, 8: 18}))
    assert sched.target_batch() == 8 and sched.curve.best_batch(8, smallest=True) == 1
    sched.ready_images = sched.waiting_requests = lambda: 40
    assert sched.batch_size_now(sched.target_batch()) in (8, 4)  # 4: one batch in EXPLORE_EVERY explores down
    sched.ready_images = lambda: 3
    assert sched.batch_size_now(sched.target_batch()) == 1
    # 40 images of one request are no backlog: a one-photo request arriving would wait for a batch of them.
    sched.ready_images, sched.waiting_requests = (lambda: 40), (lambda: 1)
    assert sched.batch_size_now(sched.target_batch()) == 1
