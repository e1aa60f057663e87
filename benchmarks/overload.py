"""``python -m detserve.benchmarks --overload``: does detserve hold under load? (issue 10)

One server, one run, these phases in order (``make bench-overload``):

    detserve with deploy.yaml's yolo application as shipped (args, limits, queues, batch cap,
    0.5 CPU per replica), one fixed replica, on an embedded local Ray (start_ray(2))
    -> peak       closed-loop saturation: the best images/s of c=8 and c=16 (loadgen.measure)
    -> burst      300 one-image requests at once (loadgen.burst), the server's own deadline:
                  how many got 200/503/408, how fast the 503s came back, their Retry-After
    -> open loop  Poisson arrivals at 2x the peak for --overload-seconds, twice: with the
                  server's own deadline (30 s), then with a client deadline
                  (``x-request-timeout-seconds: 2``): goodput (200s per second) / peak, the p99
                  of the 200s against the deadline, the share shed and who shed it
    -> mixed      a closed-loop one-image client alone (idle), then the same client beside one
                  sending 64-image requests of large JPEGs (JSON and multipart in turn): the small
                  requests' p50/p99 during / idle, and the extra in batch times
    -> bench-results/<timestamp>-overload/{results.json, results.md}

Why one fixed replica: goodput is divided by the peak, so both must be measured on
the same capacity; the shipped autoscaler (1-2 replicas) would add a replica in one
phase and not another, and on 2 cores a second replica has no core of its own.

Why two deadlines: with the server's 30 s, up to 24 s of work may queue (the plan's 80 %
headroom), so Retry-After values are long and most accepted requests wait; a short client
deadline (``x-request-timeout-seconds: 2``) makes admission decide on almost every
request, with 0.5 s of proxy margin out of 2 s. Both are shed mostly in the proxy
(serve/proxy_admission.py), before the replica hop; each 503 is labelled with who gave it
(``classify``). ``--overload-deadline 0`` runs only the first.

The summaries (``burst_summary``, ``open_loop_summary``, ``mixed_summary``) and the
markdown are pure functions of what was measured: tests/test_benchmarks.py feeds
them hand-made inputs.
"""

from __future__ import annotations

import asyncio
import collections
import datetime as dt
import json
import os
import time
import traceback
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any, Sequence

from detserve.benchmarks import loadgen, peers, raw, report
from detserve.benchmarks.loadgen import ClosedLoop, OpenLoop, PointResult, WindowPlan, ms, percentile
from detserve.benchmarks.multipart import JSON_HEADERS, json_images_body, multipart_request
from detserve.benchmarks.payloads import jpeg_payloads, large_payloads
from detserve.benchmarks.run import _loadavg, detserve_requests, log, machine_info, model_info, resolve_model, versions
from detserve.benchmarks.server import APP, end_own_children, shipped_settings, start_detserve
from detserve.serve.app import DEADLINE_HEADER  # the client's deadline (Ray's proxy honours it too)
from detserve.serve.admission import REFUSED_BY_HEADER

#: The issue's targets: goodput at 2x arrival, and a small request's latency beside a large one.
GOODPUT_TARGET = 0.9
FAIRNESS_BATCHES = 2.0
#: A 503 counts as immediate when the slowest one came back within this, and before the median 200.
IMMEDIATE_S = 1.0
#: Seconds between the app answering and the first phase.
SETTLE_S = 5.0


@dataclass(frozen=True)
class OverloadPlan:
    burst: int = 300
    open_seconds: float = 60.0
    open_factor: float = 2.0  # open-loop arrival rate / peak
    deadline_s: float = 2.0  # the second open loop's x-request-timeout-seconds (0: no second loop)
    server_deadline_s: float = 30.0  # deploy.yaml's request_timeout_s: the first open loop's deadline
    large_images: int = 64
    large_side: int = 3000  # px, square JPEGs: 9 MP, a phone photo's size
    peak_concurrency: tuple[int, ...] = (8, 16)


@dataclass(frozen=True)
class Reply:
    """One request of the burst: its status, seconds from send to last byte, and what a 503 said."""

    status: int | str
    seconds: float
    retry_after: str | None = None
    code: str | None = None
    shed_by: str | None = None  # for a 503: "haproxy", "proxy" (detserve's admission there), "replica" (its scheduler) or "ray-queue"


# --- summaries (pure) ---------------------------------------------------------------


def _spread(values: Sequence[float]) -> dict[str, float | None]:
    return {"p50": ms(percentile(values, 50), 1), "p99": ms(percentile(values, 99), 1), "max": ms(max(values), 1) if values else None}


def classify(status: int, headers: Any, body: bytes) -> tuple[str | None, str | None, str | None]:
    """(Retry-After, error code, who shed it) of one response; the code and the shedder only for JSON errors."""
    retry_after = headers.get("Retry-After") if headers is not None else None
    if status == 200:
        return retry_after, None, None
    try:
        code = str(json.loads(body)["error"]["code"])
    except Exception:
        return retry_after, "not-json", None
    shed_by = None
    if status == 503 and code == "overloaded":
        # detserve's admission says who refused (haproxy, proxy or replica: serve/admission.py); a 503 without it is Ray's queue.
        shed_by = (headers.get(REFUSED_BY_HEADER) if headers is not None else None) or "ray-queue"
    return retry_after, code, shed_by


def shed_latency(shed_s: Sequence[float], ok_p50_s: float | None) -> dict:
    """How fast the 503s came back: p50/p99/max in ms, and ``immediate``: the slowest within IMMEDIATE_S and before the median 200."""
    out: dict[str, Any] = _spread(shed_s)
    out["immediate"] = None if not shed_s else max(shed_s) <= IMMEDIATE_S and (ok_p50_s is None or max(shed_s) <= ok_p50_s)
    return out


def burst_summary(replies: Sequence[Reply]) -> dict:
    """Counts by status, how fast the 503s came (and whether immediately), their Retry-After values, the 200s' latency."""
    statuses = collections.Counter(str(r.status) for r in replies)
    ok = [r.seconds for r in replies if r.status == 200]
    shed = [r for r in replies if r.status == 503]
    retry_after = collections.Counter(r.retry_after or "none" for r in shed)
    ms_503 = shed_latency([r.seconds for r in shed], percentile(ok, 50))
    ms_200 = _spread(ok)
    return {
        "requests": len(replies),
        "statuses": dict(sorted(statuses.items())),
        "codes": dict(sorted(collections.Counter(f"{r.status} {r.code}" for r in replies if r.status != 200).items())),
        "shed_by": dict(collections.Counter(r.shed_by or "?" for r in shed)),
        "answered_200_share": len(ok) / len(replies) if replies else None,
        "unanswered": sum(1 for r in replies if not isinstance(r.status, int)),
        "ms_503": ms_503,
        "ms_200": ms_200,
        "immediate_503": ms_503.pop("immediate"),
        "retry_after_s": dict(sorted(retry_after.items(), key=lambda kv: _retry_key(kv[0]))),
        "retry_after_missing": retry_after.get("none", 0),
    }


def open_loop_summary(point: dict, peak_images_per_s: float | None, deadline_s: float) -> dict:
    """Goodput / peak, the 200s' p99 against the deadline, the share shed (503) and what else failed."""
    errors = dict(point.get("errors") or {})
    ok = int(point.get("ok", 0))
    answered = ok + sum(errors.values())
    shed = errors.get("503", 0)
    late = errors.get("408", 0) + errors.get("timeout", 0)
    goodput = float(point.get("images_per_s") or 0.0)
    p99_ms = (point.get("latency_ms") or {}).get("p99")
    x_peak = goodput / peak_images_per_s if peak_images_per_s else None
    return {
        "rate": point.get("rate"),
        "offered_x_peak": point["rate"] / peak_images_per_s if peak_images_per_s and point.get("rate") else None,
        "seconds": point.get("seconds"),
        "goodput_images_per_s": goodput,
        "goodput_x_peak": x_peak,
        "p50_ms": (point.get("latency_ms") or {}).get("p50"),
        "p99_ms": p99_ms,
        "deadline_s": deadline_s,
        "p99_x_deadline": p99_ms / (1000.0 * deadline_s) if p99_ms is not None and deadline_s else None,
        "answered": answered,
        "shed_share": shed / answered if answered else None,
        "late": late,  # 408s and client timeouts: admitted and not answered in time
        "other_errors": {k: v for k, v in errors.items() if k not in ("503", "408", "timeout")},
        "dropped": point.get("dropped", 0),  # arrivals the client skipped (max_in_flight): offered load lost
        "meets_goodput_target": None if x_peak is None else x_peak >= GOODPUT_TARGET,
        "meets_p99_target": None if p99_ms is None else p99_ms < 1000.0 * deadline_s,
    }


def batch_seconds(stats: dict | None) -> float | None:
    """One batch at the replica's chosen size, in seconds, from its ``/stats`` (the measured cost curve)."""
    scheduler = (stats or {}).get("scheduler") or {}
    per_image = scheduler.get("ms_per_image_by_batch") or {}
    size = scheduler.get("target_batch_size")
    if not per_image or not size:
        return None
    nearest = min((int(k) for k in per_image), key=lambda k: (abs(k - int(size)), k))
    return int(size) * float(per_image[str(nearest)]) / 1000.0


def mixed_summary(idle: dict, during: dict, large: dict, batch_s: float | None) -> dict:
    """The small requests' p50/p99 beside large ones: as a ratio to idle, and the extra in batch times."""
    out: dict[str, Any] = {"batch_ms": ms(batch_s, 1)}
    for q in ("p50", "p99"):
        a, b = (idle.get("latency_ms") or {}).get(q), (during.get("latency_ms") or {}).get(q)
        out[f"idle_{q}_ms"], out[f"during_{q}_ms"] = a, b
        out[f"{q}_ratio"] = b / a if a and b is not None else None
        out[f"{q}_extra_batches"] = (b - a) / (1000.0 * batch_s) if a is not None and b is not None and batch_s else None
    extra = out["p99_extra_batches"]
    out["meets_fairness_target"] = None if extra is None else extra <= FAIRNESS_BATCHES
    # The engine's own ms per image (every image, from /stats): a rise is CPU taken by the large requests, not batching order.
    out["engine_ms_per_image"] = {k: ((p.get("server_stats") or {}).get("stage_ms_per_image") or {}).get("engine") for k, p in (("idle", idle), ("during", during))}
    out["small_errors"] = {**(idle.get("errors") or {}), **{f"during {k}": v for k, v in (during.get("errors") or {}).items()}}
    large_lat = large.get("latency_ms") or {}
    out["large"] = {"answered_200": large.get("ok", 0), "errors": large.get("errors") or {}, "sent": large.get("requests_sent", 0),
                    "p50_s": None if large_lat.get("p50") is None else large_lat["p50"] / 1000.0}  # fmt: skip
    return out


def count_diff(before: dict | None, after: dict | None) -> dict[str, int]:
    """What the replica's admission did between two ``/stats`` snapshots: admitted, shed, deadline, cancelled."""
    a = ((before or {}).get("scheduler") or {}).get("counts") or {}
    b = ((after or {}).get("scheduler") or {}).get("counts") or {}
    return {k: int(b.get(k, 0)) - int(a.get(k, 0)) for k in sorted(set(a) | set(b)) if int(b.get(k, 0)) - int(a.get(k, 0))}


# --- markdown (pure) -------------------------------------------------------------------


def _x(value: float | None, digits: int = 2) -> str:
    return "—" if value is None else f"{value:.{digits}f}×"


def _pct(value: float | None) -> str:
    return "—" if value is None else f"{100 * value:.0f} %"


def _met(flag: bool | None) -> str:
    return {True: "yes", False: "**no**", None: "—"}[flag]


def _counts(counts: dict) -> str:
    return ", ".join(f"{k}: {v}" for k, v in counts.items()) or "—"


def markdown(results: dict) -> str:
    """The overload report: one table of measured values against the issue's targets, then the details."""
    m, cfg = results.get("machine", {}), results.get("config", {})
    peak = results.get("peak_images_per_s")
    b = (results.get("burst") or {}).get("summary") or {}
    loops = [entry.get("summary") or {} for entry in results.get("open_loops") or []]
    x = (results.get("mixed") or {}).get("summary") or {}
    out = [
        f"# detserve overload benchmark ({results.get('created', '')})",
        "",
        f"Machine: {m.get('cpu_count')} CPUs ({m.get('cpu_model')}), load average {m.get('loadavg_start')} at start, "
        f"{m.get('loadavg_end')} at end. Model: {results.get('model', {}).get('name')} ({results.get('model', {}).get('imgsz')} px). "
        f"Server: {cfg.get('settings', '?')}. Client and server share these cores: read the ratios.",
        "",
        *_calibration(results.get("calibration_ms") or {}),
        "| scenario | measured | target | met |",
        "|---|---|---|---|",
        f"| peak (closed loop, best of c={'/'.join(str(c) for c in cfg.get('peak_concurrency', []))}) | "
        f"{report._fmt(peak)} images/s | — | — |",
        f"| burst of {b.get('requests', '?')} at once: answered 200 | {b.get('statuses', {}).get('200', 0)} "
        f"({_pct(b.get('answered_200_share'))}); {_counts({k: v for k, v in b.get('statuses', {}).items() if k != '200'})} | "
        "every one answered | " + _met(None if not b else b.get("unanswered") == 0 and b.get("statuses", {}).get("408", 0) == 0) + " |",
        f"| burst: 503 latency p50 / p99 / max | {_triple(b.get('ms_503'))} ms (200s: p50 {report._fmt((b.get('ms_200') or {}).get('p50'))} ms) | "
        f"immediate (≤ {IMMEDIATE_S:g} s, before the median 200) | {_met(b.get('immediate_503'))} |",
        f"| burst: Retry-After (s: count) | {_counts(b.get('retry_after_s') or {})} | computed, on every 503 | "
        + _met(None if not b.get("retry_after_s") else b.get("retry_after_missing") == 0) + " |",
    ]
    for o in loops:
        label = f"open loop at {_x(o.get('offered_x_peak'), 1)} peak, {o.get('deadline_from', '?')} deadline {report._fmt(o.get('deadline_s'))} s"
        out += [
            f"| {label}, {report._fmt(o.get('seconds'))} s measured: goodput / peak | {_x(o.get('goodput_x_peak'))} "
            f"({report._fmt(o.get('goodput_images_per_s'))} images/s) | ≥ {GOODPUT_TARGET:g}× | {_met(o.get('meets_goodput_target'))} |",
            f"| {label}: p99 of the 200s / deadline | {_x(o.get('p99_x_deadline'))} (p99 {report._fmt(o.get('p99_ms'))} ms) | < 1× | "
            f"{_met(o.get('meets_p99_target'))} |",
            f"| {label}: shed (503) / late (408, timeout) | {_pct(o.get('shed_share'))} (by {_counts(o.get('shed_by') or {})}) / "
            f"{o.get('late', '—')} | — | — |",
            f"| {label}: 503 latency p50 / p99 / max | {_triple(o.get('ms_503'))} ms"
            + "".join(f"; {by} {_triple(spread)}" for by, spread in (o.get("ms_503_by") or {}).items() if len(o.get("ms_503_by") or {}) > 1)
            + f" | immediate (≤ {IMMEDIATE_S:g} s, before the median 200) | "
            f"{_met((o.get('ms_503') or {}).get('immediate'))} |",
        ]
    out += [
        f"| mixed: one-image p50 during / idle | {_x(x.get('p50_ratio'))} ({report._fmt(x.get('idle_p50_ms'))} → "
        f"{report._fmt(x.get('during_p50_ms'))} ms, +{report._fmt(x.get('p50_extra_batches'))} batch times) | — | — |",
        f"| mixed: one-image p99 during / idle | {_x(x.get('p99_ratio'))} ({report._fmt(x.get('idle_p99_ms'))} → "
        f"{report._fmt(x.get('during_p99_ms'))} ms, +{report._fmt(x.get('p99_extra_batches'))} batch times of "
        f"{report._fmt(x.get('batch_ms'))} ms) | ≤ idle + {FAIRNESS_BATCHES:g} batch times | {_met(x.get('meets_fairness_target'))} |",
    ]
    large = x.get("large") or {}
    out += [
        "",
        f"- Large client: {cfg.get('large_images')} images of {cfg.get('large_side')}x{cfg.get('large_side')} px per request "
        f"(JSON {report._fmt((cfg.get('large_body_bytes') or {}).get('json', 0) / 2**20)} MiB, multipart "
        f"{report._fmt((cfg.get('large_body_bytes') or {}).get('multipart', 0) / 2**20)} MiB, in turn): "
        f"{large.get('sent', 0)} sent, {large.get('answered_200', 0)} answered 200 (p50 {report._fmt(large.get('p50_s'))} s), "
        f"errors {_counts(large.get('errors') or {})}. The engine's ms per image, idle → during: "
        f"{report._fmt((x.get('engine_ms_per_image') or {}).get('idle'))} → {report._fmt((x.get('engine_ms_per_image') or {}).get('during'))}.",
        f"- Burst: non-200 by code: {_counts(b.get('codes') or {})}; 503s shed by {_counts(b.get('shed_by') or {})}.",
    ]
    for o in loops:
        out.append(f"- Open loop, {o.get('deadline_from')} deadline: {o.get('answered', 0)} answered in the measured windows, "
                   f"other errors {_counts(o.get('other_errors') or {})}, {o.get('dropped', 0)} arrivals dropped by the client, "
                   f"Retry-After of its 503s (s: count) {_counts(o.get('retry_after_s') or {})}.")  # fmt: skip
    admitted = results.get("admission") or {}
    if admitted:
        out.append("- Replica admission counts (and the throughput it measured under a backlog, images/s, after) by phase: " + "; ".join(f"{k}: {_counts(v)}" for k, v in admitted.items()) + ".")
    for p in results.get("peak") or []:
        out.append(f"- Peak c={p['concurrency']}: {report._fmt(p['images_per_s'])} images/s, p99 {report._fmt(p['latency_ms'].get('p99'))} ms, "
                   f"errors {_counts(p.get('errors') or {})}, {'stable' if p.get('stable') else 'unstable'}.")  # fmt: skip
    errors = results.get("errors") or {}
    if errors:
        out += ["", "## Errors", ""] + [f"- {k}: {str(v).splitlines()[0][:300]}" for k, v in errors.items()]
    out.append("")
    return "\n".join(out)


def _calibration(calibration: dict[str, float]) -> list[str]:
    """The background-load line (report.py's rule): the raw engine's ms/image before each phase, and a warning past the spread."""
    values = [v for v in calibration.values() if v]
    if not values:
        return []
    spread = (max(values) - min(values)) / min(values)
    lines = ["Background load check — the raw engine's ms/image (batch 1, 1 thread, median of 1 s) before each phase: "
             + ", ".join(f"{k} {v:.1f}" for k, v in calibration.items()) + f" (spread {100 * spread:.0f} %).", ""]  # fmt: skip
    if spread > report.CALIBRATION_SPREAD:
        lines[-1:] = [f"**The machine's background load changed by more than {100 * report.CALIBRATION_SPREAD:.0f} % during this run: "
                      "ratios between phases (goodput / peak) are not trustworthy; re-run.**", ""]  # fmt: skip
    return lines


def _triple(spread: dict | None) -> str:
    if not spread or spread.get("p50") is None:
        return "—"
    return " / ".join(report._fmt(spread.get(k)) for k in ("p50", "p99", "max"))


# --- payloads ------------------------------------------------------------------------------


def large_requests(images: list[bytes]) -> list[loadgen.HttpRequest]:
    """The same images as one JSON request and one multipart request, sent in turn."""
    return [
        loadgen.HttpRequest(f"/{APP}/predict", json_images_body(images), JSON_HEADERS),
        loadgen.HttpRequest(f"/{APP}/predict", *multipart_request(images)),
    ]


# --- the server, as shipped --------------------------------------------------------------


def shipped_yolo(folder: Path) -> tuple[dict, dict]:
    """deploy.yaml's yolo application: (args, deployment options), with ``folder`` as the model and one fixed replica."""
    settings = shipped_settings(model=str(folder))
    return settings.args, settings.options


# --- phases ---------------------------------------------------------------------------------


async def _stats(base: str) -> dict | None:
    async with loadgen.http_session(2, 10) as session:
        return await loadgen.http_stats(session, f"{base}/{APP}/stats")()


async def measure_peak(base: str, requests, concurrency: Sequence[int], server_cpu) -> list[PointResult]:
    plan = WindowPlan(warmup_s=3.0, window_s=3.0, min_windows=3, max_windows=6, max_requests=20_000, max_seconds=30.0)
    return await loadgen.measure_http("peak", base, requests, [ClosedLoop(c) for c in concurrency], plan,
                                      stats_url=f"{base}/{APP}/stats", server_cpu=server_cpu, log=log)  # fmt: skip


async def measure_burst(base: str, payloads: list[bytes], n: int) -> list[Reply]:
    seen: dict[int, tuple[str | None, str | None, str | None]] = {}

    def keep(i: int, status: int, headers: Any, body: bytes) -> None:
        seen[i] = classify(status, headers, body)

    async with loadgen.http_session(n + 2, 60.0) as session:
        send = loadgen.http_sender(session, base, detserve_requests(payloads), on_response=keep)
        results = await loadgen.burst(send, n, timeout_s=60.0)
    return [Reply(status, seconds, *seen.get(i, (None, None, None))) for i, (status, seconds) in enumerate(results)]


async def measure_open_loop(base: str, payloads: list[bytes], rate: float, seconds: float, deadline_s: float, header: bool, server_cpu) -> tuple[PointResult, dict]:
    """One open-loop point; ``header``: send ``deadline_s`` as x-request-timeout-seconds (else it is the server's own).

    Returns the point and, over the whole point, who shed the 503s and their Retry-After values.
    """
    headers = (("Content-Type", "image/jpeg"), *(((DEADLINE_HEADER, f"{deadline_s:g}"),) if header else ()))
    requests = [loadgen.HttpRequest(f"/{APP}/predict", p, headers) for p in payloads]
    warmup = min(5.0, seconds / 6)
    window = WindowPlan(
        warmup_s=warmup, window_s=(seconds - warmup) / 3, min_windows=3, max_windows=3,
        max_requests=int(rate * seconds * 1.5) + 100, max_seconds=seconds + 10,
        request_timeout_s=deadline_s + 10, drain_s=deadline_s + 5,
    )  # fmt: skip
    # Room for every arrival to stay in flight until its deadline: the client never holds back offered load.
    shape = OpenLoop(rate=rate, max_in_flight=int(rate * (deadline_s + 2)) + 64, seed=1)
    shed_by: collections.Counter[str] = collections.Counter()
    retry_after: collections.Counter[str] = collections.Counter()
    who: dict[int, str] = {}

    def keep(i: int, status: int, response_headers: Any, body: bytes) -> None:
        if status == 503:
            after, _, by = classify(status, response_headers, body)
            who[i] = by or "?"
            shed_by[who[i]] += 1
            retry_after[after or "none"] += 1

    # From the actual send (not the planned arrival): how fast the server said no, by who said it.
    shed_s: dict[str, list[float]] = collections.defaultdict(list)

    async with loadgen.http_session(shape.max_in_flight + 2, window.request_timeout_s) as session:
        send = loadgen.http_sender(session, base, requests, on_response=keep)

        async def timed(i: int) -> loadgen.Status:
            started = time.perf_counter()
            status = await send(i)
            if status == 503:
                shed_s[who.pop(i, "?")].append(time.perf_counter() - started)
            return status

        point = await loadgen.measure("open", timed, shape, window, stats=loadgen.http_stats(session, f"{base}/{APP}/stats"),
                                      server_cpu=server_cpu, log=log)  # fmt: skip
    p50 = point.latency_ms.get("p50")
    return point, {
        "shed_by": dict(shed_by),
        "retry_after_s": dict(sorted(retry_after.items(), key=lambda kv: _retry_key(kv[0]))),
        "ms_503": shed_latency([x for xs in shed_s.values() for x in xs], None if p50 is None else p50 / 1000.0),
        "ms_503_by": {by: _spread(xs) for by, xs in sorted(shed_s.items())},
    }


def _retry_key(value: str) -> tuple[bool, float]:
    try:
        return False, float(value)
    except ValueError:
        return True, 0.0


async def measure_mixed(base: str, payloads: list[bytes], large: list[loadgen.HttpRequest]) -> tuple[PointResult, PointResult, PointResult, dict | None]:
    """(idle small, small during large, large, /stats after idle): one closed-loop one-image client, alone, then beside the large one."""
    small = detserve_requests(payloads)
    plan = WindowPlan(warmup_s=2.0, window_s=4.0, min_windows=3, max_windows=3, max_requests=20_000, max_seconds=30.0)
    (idle,) = await loadgen.measure_http("small-idle", base, small, [ClosedLoop(1)], plan, stats_url=f"{base}/{APP}/stats", log=log)
    stats_idle = await _stats(base)
    during_plan = replace(plan, warmup_s=3.0)  # the first large request is uploaded, parsed and decoding
    span = during_plan.warmup_s + during_plan.max_windows * during_plan.window_s + 1.0
    large_plan = WindowPlan(warmup_s=0.0, window_s=span, min_windows=1, max_windows=1, max_requests=1_000,
                            max_seconds=span + 1.0, request_timeout_s=60.0, drain_s=1.0)  # fmt: skip
    async with loadgen.http_session(3, plan.request_timeout_s) as s_small, loadgen.http_session(3, 60.0) as s_large:
        during, big = await asyncio.gather(
            loadgen.measure("small-during", loadgen.http_sender(s_small, base, small), ClosedLoop(1), during_plan,
                            stats=loadgen.http_stats(s_small, f"{base}/{APP}/stats"), log=log),  # fmt: skip
            loadgen.measure("large", loadgen.http_sender(s_large, base, large), ClosedLoop(1), large_plan),
        )
    return idle, during, big, stats_idle


# --- the run --------------------------------------------------------------------------------


def run(plan: OverloadPlan, *, model: str | None, out_root: Path) -> tuple[dict, dict[str, Path]]:
    from detserve.serve.run import shutdown

    stamp = dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    outdir = out_root / f"{stamp}-overload"
    folder = resolve_model(model)
    args, options = shipped_yolo(folder)
    plan = replace(plan, server_deadline_s=float(args.get("request_timeout_s", plan.server_deadline_s)))
    results: dict[str, Any] = {
        "schema": 1, "profile": "overload", "created": dt.datetime.now().astimezone().isoformat(timespec="seconds"),
        "machine": machine_info(), "versions": versions(), "model": model_info(folder),
        "config": {**asdict(plan), "args": args, "options": options,
                   "settings": "deploy.yaml's yolo application, 1 fixed replica (num_cpus 0.5: 1 engine lane, 2 decode threads), start_ray(2)"},
        "errors": {},
    }  # fmt: skip
    began = time.monotonic()
    payloads = jpeg_payloads(32)
    large = large_requests(large_payloads(plan.large_images, plan.large_side))
    results["config"]["large_body_bytes"] = {"json": len(large[0].body), "multipart": len(large[1].body)}

    def server_cpu() -> float | None:
        return peers.process_tree_cpu(os.getpid(), include_self=False)

    probe = raw.LoadProbe(folder, payloads[0])
    results["calibration_ms"] = {}
    try:
        base, _ = start_detserve(args, options, request_timeout_s=float(args.get("request_timeout_s", 30.0)))
        results["start_s"] = round(time.monotonic() - began, 1)
        log(f"detserve up on {base}/{APP} in {results['start_s']} s")
        # Ray's own processes are still busy for a few seconds after the app answers (one run's first
        # background-load probe read 15 ms against 10 ms for every later one): let them settle.
        time.sleep(SETTLE_S)
        asyncio.run(_phases(base, payloads, large, plan, results, server_cpu, probe))
    except Exception as exc:
        results["errors"]["run"] = f"{type(exc).__name__}: {exc}"
        traceback.print_exc()
    finally:
        shutdown()
    left = end_own_children()
    if left:
        results["errors"]["cleanup"] = f"child processes still running after the run were ended: {left}"
    results["calibration_ms"]["end"] = probe.ms_per_image()
    results["machine"]["loadavg_end"] = _loadavg()
    results["total_seconds"] = round(time.monotonic() - began, 1)
    outdir.mkdir(parents=True, exist_ok=True)
    files = {"json": report.write_json(results, outdir / "results.json")}
    (outdir / "results.md").write_text(markdown(results))
    files["markdown"] = outdir / "results.md"
    return results, files


async def _phases(base: str, payloads, large, plan: OverloadPlan, results: dict, server_cpu, probe: raw.LoadProbe) -> None:
    requests = detserve_requests(payloads)
    admission = results["admission"] = {}

    async def phase(name: str, coro):
        results["calibration_ms"][name] = await asyncio.to_thread(probe.ms_per_image)  # the server is idle between phases
        log(f"== {name}")
        before = await _stats(base)
        t = time.monotonic()
        try:
            return await coro
        finally:
            after = await _stats(base)
            admission[name] = {**count_diff(before, after), "measured_images_per_s_after": ((after or {}).get("scheduler") or {}).get("measured_images_per_s")}
            results.setdefault("phase_seconds", {})[name] = round(time.monotonic() - t, 1)

    peak = await phase("peak", measure_peak(base, requests, plan.peak_concurrency, server_cpu))
    results["peak"] = [p.to_dict() for p in peak]
    results["peak_images_per_s"] = best = max((p.images_per_s for p in peak), default=None)
    replies = await phase("burst", measure_burst(base, payloads, plan.burst))
    results["burst"] = {"summary": burst_summary(replies), "replies": [asdict(r) for r in replies]}
    log(f"  burst: {results['burst']['summary']['statuses']}")
    await asyncio.sleep(2.0)  # what the burst left behind drains
    loops = [("server", plan.server_deadline_s, False)] + ([("client", plan.deadline_s, True)] if plan.deadline_s > 0 else [])
    results["open_loops"] = []
    for who, deadline, header in loops if best else []:
        rate = round(plan.open_factor * best, 1)
        name = f"open loop, {who} deadline {deadline:g} s"
        point, shed = await phase(name, measure_open_loop(base, payloads, rate, plan.open_seconds, deadline, header, server_cpu))
        summary = {**open_loop_summary(point.to_dict(), best, deadline), **shed, "deadline_from": who}
        results["open_loops"].append({"name": name, "point": point.to_dict(), "summary": summary})
        log(f"  goodput {summary['goodput_x_peak']:.2f}x peak, p99 {summary['p99_ms']} ms, shed {summary['shed_by']}")
        await asyncio.sleep(2.0)
    idle, during, big, stats_idle = await phase("mixed", measure_mixed(base, payloads, large))
    results["mixed"] = {
        "idle": idle.to_dict(), "during": during.to_dict(), "large": big.to_dict(), "stats_idle": stats_idle,
        "summary": mixed_summary(idle.to_dict(), during.to_dict(), big.to_dict(), batch_seconds(stats_idle)),
    }  # fmt: skip
    results["stats_end"] = await _stats(base)


def main(args) -> int:
    """``--overload`` from ``benchmarks.run``'s parser."""
    plan = OverloadPlan(burst=args.overload_burst, open_seconds=args.overload_seconds, deadline_s=args.overload_deadline,
                        large_side=args.overload_large_side)  # fmt: skip
    results, files = run(plan, model=args.model, out_root=Path(args.out))
    report.show(files["markdown"].read_text(), files.values())
    return 1 if results["errors"] else 0
