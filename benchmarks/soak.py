"""``python -m detserve.benchmarks.soak [--seconds 600]`` (``make soak``): a long, mixed, open-loop load that looks for leaks.

    detserve on an in-process Ray (start_ray(2)), deploy.yaml's yolo settings, one replica
    -> capacity: closed loop (c=8, c=16) over the soak's own request mix, in requests/s
    -> file descriptors at rest -> open loop (Poisson) at 70 % of that for --seconds,
       a sample every 10 s (replica pid/RSS/fds from its /stats, the proxy's from psutil)
    -> file descriptors at rest -> the verdict -> bench-results/soak-<timestamp>/{soak.json, soak.md}

The mix (``build_mix``) cycles, in a fixed shuffled order, through good images
(small and large JPEG and PNG), multi-image requests (multipart and JSON) and
bad inputs (not an image, a truncated JPEG, an unsupported Content-Type, too
many images, an oversized body with Content-Length and one sent chunked). Each
kind has one expected answer (``Expect``: the status and, for errors, the
documented code); a 503 ``overloaded`` with Retry-After is counted apart as
shed load, anything else is unexpected.

The verdict (``evaluate``) passes when, over the whole load: no answer was
unexpected; the load ran its full length with no arrival dropped by the client;
the replica and the proxy were the same processes throughout (a restart would
hide a leak); the replica's RSS at the last sample is within 10 % of its RSS at
the baseline (the first sample at or after ``--warmup-s`` of the load: the
allocator and the connection pools have grown to their working size by then);
and the open file descriptors of the replica and the proxy, counted at rest
(no client connection open) before and after the load, grew by at most
``FD_SLACK``.

The load generator is ``benchmarks.loadgen`` (its open loop, windows and HTTP
transport); everything here apart from ``run`` and its helpers is a pure
function that the tests call without Ray.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import datetime as dt
import functools
import json
import math
import random
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Sequence

from detserve.runtime import offline, paths

offline.apply()

from detserve.benchmarks import loadgen  # noqa: E402
from detserve.benchmarks.loadgen import ClosedLoop, HttpRequest, OpenLoop, WindowPlan, log  # noqa: E402
from detserve.benchmarks.multipart import JSON_HEADERS, json_images_body, multipart_body, multipart_headers  # noqa: E402
from detserve.benchmarks.payloads import encode  # noqa: E402
from detserve.benchmarks.server import end_own_children, shipped_settings, start_detserve, stop_on_sigterm  # noqa: E402

APP = "soak"

#: The replica's RSS at the end may differ from the baseline by at most this share.
RSS_TOLERANCE = 0.10
#: Open file descriptors at rest after the load may exceed those before by at most this many
#: (Ray opens a few sockets and pipes of its own over ten minutes: metrics, gRPC channels).
FD_SLACK = 8
#: Answers that are shed load, not failures: 503 overloaded with a Retry-After header.
SHED = "503 overloaded +Retry-After"
NO_ANSWER = "no answer (client timeout)"


# --- the request mix -------------------------------------------------------------


@dataclass(frozen=True)
class Expect:
    """The one answer a kind of request should get: the status and, for errors, the documented code."""

    status: int
    code: str | None = None

    @property
    def label(self) -> str:
        return str(self.status) if self.code is None else f"{self.status} {self.code}"


@dataclass(frozen=True)
class Kind:
    name: str
    what: str
    expect: Expect
    weight: int  # entries of this kind in one cycle of the mix
    good: bool = False


OK = Expect(200)

#: Every kind of request the soak sends, with its expected answer and its share of the mix.
#: Per cycle of 96: 79 answered 200 (123 images), 17 refused; the two oversized bodies are
#: 1 each, since each moves 50 MiB through the proxy.
KINDS: tuple[Kind, ...] = (
    Kind("jpeg_small", "one JPEG, 200-480 px", OK, 46, True),
    Kind("png_small", "one PNG, 200-480 px", OK, 16, True),
    Kind("jpeg_large", "one JPEG, 1920x1440", OK, 6, True),
    Kind("png_large", "one PNG, 1920x1440", OK, 3, True),
    Kind("multi_multipart", "8 JPEGs as multipart/form-data", OK, 5, True),
    Kind("multi_json", "4 JPEGs as JSON base64", OK, 3, True),
    Kind("not_an_image", "text sent as image/jpeg", Expect(400, "not_an_image"), 4),
    Kind("truncated_jpeg", "the first half of a JPEG", Expect(400, "corrupt_image"), 4),
    Kind("unsupported_type", "Content-Type text/plain", Expect(415, "unsupported_media_type"), 4),
    Kind("too_many_images", "max_images + 1 multipart parts", Expect(413, "too_many_images"), 3),
    Kind("oversized_body", "max_body_bytes + 1 KiB, with Content-Length", Expect(413, "body_too_large"), 1),
    Kind("oversized_chunked", "max_body_bytes + 1 KiB, chunked (no Content-Length)", Expect(413, "body_too_large"), 1),
)
KIND_BY_NAME = {k.name: k for k in KINDS}

BOUNDARY = "detservesoakboundary"


def _multipart(files: Sequence[bytes]) -> bytes:
    return multipart_body(files, boundary=BOUNDARY, field="file", filename="{i}.jpg")


@functools.lru_cache(maxsize=2)
def _images(seed: int) -> dict[str, tuple[bytes, ...]]:
    """The encoded good images (generated scenes), made once per process: small JPEG/PNG, large JPEG/PNG."""
    from PIL import Image

    from detserve.training.synthetic import scenes

    small = [s.image for s in scenes(16, seed)]
    large = dict(size=(1920, 1440), resample=Image.BILINEAR)
    return {
        "jpeg_small": tuple(encode(img, "JPEG", quality=90) for img in small),
        "png_small": tuple(encode(img, "PNG") for img in small[:8]),
        "jpeg_large": tuple(encode(img, "JPEG", quality=90, **large) for img in small[:3]),
        "png_large": tuple(encode(img, "PNG", **large) for img in small[:2]),
    }


def payloads(max_body_bytes: int, max_images: int, seed: int = 7) -> dict[str, list[tuple[bytes, tuple[tuple[str, str], ...], int | None]]]:
    """Per kind, the request variants to rotate through: (body, headers, chunk_size)."""
    images = _images(seed)
    jpegs = images["jpeg_small"]
    jpeg, png = (("Content-Type", "image/jpeg"),), (("Content-Type", "image/png"),)
    multipart = multipart_headers(BOUNDARY)
    oversized = b"\xff\xd8" + bytes(max_body_bytes + 1022)  # past the limit by 1 KiB; a JPEG's first bytes
    return {
        "jpeg_small": [(j, jpeg, None) for j in jpegs],
        "png_small": [(b, png, None) for b in images["png_small"]],
        "jpeg_large": [(b, jpeg, None) for b in images["jpeg_large"]],
        "png_large": [(b, png, None) for b in images["png_large"]],
        "multi_multipart": [(_multipart(jpegs[i : i + min(8, max_images)]), multipart, None) for i in (0, 8)],
        "multi_json": [(json_images_body(jpegs[i : i + min(4, max_images)]), JSON_HEADERS, None) for i in (0, 4, 8, 12)],
        "not_an_image": [(b"this is not an image, it is text", jpeg, None)],
        "truncated_jpeg": [(j[: len(j) // 2], jpeg, None) for j in jpegs[:4]],
        "unsupported_type": [(jpegs[0], (("Content-Type", "text/plain"),), None)],
        "too_many_images": [(_multipart([jpegs[0][:64]] * (max_images + 1)), multipart, None)],
        "oversized_body": [(oversized, jpeg, None)],
        "oversized_chunked": [(oversized, jpeg, 1024 * 1024)],
    }


def build_mix(max_body_bytes: int, max_images: int, path: str, seed: int = 0, kinds: Sequence[Kind] = KINDS) -> tuple[list[str], list[HttpRequest]]:
    """One cycle of the mix, shuffled once (fixed seed): the kind of each entry and its request."""
    variants = payloads(max_body_bytes, max_images)
    entries: list[tuple[str, HttpRequest]] = []
    for kind in kinds:
        for j in range(kind.weight):
            body, headers, chunk = variants[kind.name][j % len(variants[kind.name])]
            entries.append((kind.name, HttpRequest(path, body, headers, chunk_size=chunk)))
    random.Random(seed).shuffle(entries)
    return [k for k, _ in entries], [r for _, r in entries]


# --- answers -----------------------------------------------------------------------


def response_label(status: int, headers: Mapping[str, str], body: bytes) -> str:
    """What came back, as one label: ``200``, ``413 body_too_large``, ``503 overloaded +Retry-After``, ``502 (no JSON error body)``."""
    if status == 200:
        return "200"
    code = None
    try:
        code = json.loads(body)["error"]["code"]
    except (ValueError, KeyError, TypeError):
        pass
    label = f"{status} {code}" if isinstance(code, str) else f"{status} (no JSON error body)"
    if status == 503 and headers.get("Retry-After"):
        label += " +Retry-After"
    return label


def outcome(expect: Expect, label: str) -> str:
    """``expected``, ``shed`` (503 overloaded with Retry-After: load refused in the documented way) or ``unexpected``."""
    if label == expect.label:
        return "expected"
    if label == SHED:
        return "shed"
    return "unexpected"


Tally = dict[str, collections.Counter]


def tallying_sender(send: loadgen.Sender, kinds: Sequence[str], tally: Tally) -> loadgen.Sender:
    """Wrap ``send`` so that every answer (or failure) is counted under the kind of request ``i``."""

    async def wrapped(i: int) -> loadgen.Status:
        counter = tally.setdefault(kinds[i % len(kinds)], collections.Counter())
        try:
            status = await send(i)
        except asyncio.CancelledError:  # loadgen's request timeout (or the final drain) cancels it
            counter[NO_ANSWER] += 1
            raise
        except Exception as exc:
            counter[f"exc:{type(exc).__name__}"] += 1
            raise
        counter[str(status)] += 1
        return status

    return wrapped


def labelling_hook(status: int, headers: Mapping[str, str], body: bytes) -> loadgen.Status:
    """loadgen's ``on_response``: 200 stays 200 (loadgen counts it as ok), the rest become their label."""
    label = response_label(status, headers, body)
    return 200 if label == "200" else label


# --- samples and the verdict --------------------------------------------------------


@dataclass
class Sample:
    """One look at the two processes a request passes through; None where a reading failed."""

    t_s: float
    replica_pid: int | None = None
    replica_rss: int | None = None
    replica_fds: int | None = None
    proxy_pid: int | None = None
    proxy_rss: int | None = None
    proxy_fds: int | None = None


@dataclass
class Check:
    name: str
    passed: bool
    detail: str


def baseline_sample(samples: Sequence[Sample], at_s: float) -> Sample | None:
    """The first sample at or after ``at_s`` seconds of load with an RSS reading."""
    return next((s for s in samples if s.t_s >= at_s and s.replica_rss is not None), None)


def last_sample(samples: Sequence[Sample]) -> Sample | None:
    return next((s for s in reversed(samples) if s.replica_rss is not None), None)


def slope_per_minute(points: Sequence[tuple[float, float]]) -> float | None:
    """Least-squares slope of (seconds, value) points, per minute; None with fewer than 3 points."""
    if len(points) < 3:
        return None
    n = len(points)
    mx = sum(x for x, _ in points) / n
    my = sum(y for _, y in points) / n
    var = sum((x - mx) ** 2 for x, _ in points)
    if var == 0:
        return None
    return 60.0 * sum((x - mx) * (y - my) for x, y in points) / var


def evaluate(
    tally: Tally,
    samples: Sequence[Sample],
    rest_before: Sample,
    rest_after: Sample,
    *,
    baseline_at_s: float,
    windows_planned: int,
    windows_measured: int,
    dropped: int,
    kinds: Mapping[str, Kind] = KIND_BY_NAME,
    rss_tolerance: float = RSS_TOLERANCE,
    fd_slack: int = FD_SLACK,
) -> list[Check]:
    """The soak's pass/fail checks, each with the figures it judged."""
    checks = []
    unexpected = {k: {label: n for label, n in c.items() if outcome(kinds[k].expect, label) == "unexpected"} for k, c in tally.items()}
    unexpected = {k: v for k, v in unexpected.items() if v}
    total = sum(sum(c.values()) for c in tally.values())
    detail = "; ".join(f"{k} (expected {kinds[k].expect.label}): {_counts(v)}" for k, v in sorted(unexpected.items()))
    checks.append(Check("no unexpected answers", total > 0 and not unexpected, detail or f"all {total} answers were the expected ones (or shed with Retry-After)"))
    missing = sorted(set(kinds) - set(tally))
    checks.append(Check("every kind of request was sent", not missing, f"never sent: {', '.join(missing)}" if missing else f"{len(kinds)} kinds"))
    checks.append(Check("the load ran its full length", windows_measured >= windows_planned, f"{windows_measured} of {windows_planned} sample windows"))
    checks.append(Check("every arrival was sent", dropped == 0, f"{dropped} arrivals dropped at the client's in-flight cap" if dropped else "none dropped"))

    for role in ("replica", "proxy"):
        pids = {getattr(s, f"{role}_pid") for s in [rest_before, *samples, rest_after]} - {None}
        checks.append(Check(f"the same {role} process throughout", len(pids) == 1, f"pid(s) {', '.join(map(str, sorted(pids))) or 'none read'}"))

    base, end = baseline_sample(samples, baseline_at_s), last_sample(samples)
    if base is None or end is None or end is base:
        checks.append(Check(f"replica RSS within {rss_tolerance:.0%} of its baseline", False, "not enough RSS samples after the warm-up"))
    else:
        change = end.replica_rss / base.replica_rss - 1
        checks.append(Check(
            f"replica RSS within {rss_tolerance:.0%} of its baseline", abs(change) <= rss_tolerance,
            f"{_mib(base.replica_rss)} at t={base.t_s:.0f} s -> {_mib(end.replica_rss)} at t={end.t_s:.0f} s ({change:+.1%})",
        ))  # fmt: skip
    for role in ("replica", "proxy"):
        before, after = getattr(rest_before, f"{role}_fds"), getattr(rest_after, f"{role}_fds")
        ok = before is not None and after is not None and after <= before + fd_slack
        shown = f"{before} -> {after} at rest" if before is not None and after is not None else "not read"
        checks.append(Check(f"{role} open fds not growing (<= +{fd_slack})", ok, shown))
    return checks


def _counts(counter: Mapping[str, int]) -> str:
    return ", ".join(f"{label} x{n}" for label, n in sorted(counter.items(), key=lambda kv: -kv[1]))


def _mib(n: int | float | None) -> str:
    return "?" if n is None else f"{n / 2**20:.0f} MiB"


# --- the report -------------------------------------------------------------------------


def kind_rows(tally: Tally, kinds: Sequence[Kind] = KINDS) -> list[dict]:
    """Per kind: what it is, the expected answer, requests sent, every answer with its count, and the counts by outcome."""
    rows = []
    for kind in kinds:
        counter = tally.get(kind.name, collections.Counter())
        by = collections.Counter()
        for label, n in counter.items():
            by[outcome(kind.expect, label)] += n
        rows.append({"kind": kind.name, "what": kind.what, "expected": kind.expect.label, "sent": sum(counter.values()),
                     "answers": dict(counter), "expected_n": by["expected"], "shed": by["shed"], "unexpected": by["unexpected"]})  # fmt: skip
    return rows


def assemble(
    tally: Tally,
    samples: Sequence[Sample],
    rest_before: Sample,
    rest_after: Sample,
    point: loadgen.PointResult,
    planned: int,
    *,
    capacity: tuple[float, float, str],
    fraction: float,
    rate: float,
    seconds: float,
    sample_s: float,
    baseline_at_s: float,
    capacity_tally: Tally | None = None,
) -> dict:
    """The judged part of soak.json: the load, answers by kind, samples, memory, checks, passed."""
    checks = evaluate(tally, samples, rest_before, rest_after, baseline_at_s=baseline_at_s, windows_planned=planned,
                      windows_measured=point.windows_measured, dropped=point.dropped)  # fmt: skip
    images = ((point.server_stats or {}).get("images") or 0) / point.seconds if point.seconds else 0.0
    return {
        "load": {"capacity_requests_per_s": capacity[0], "capacity_images_per_s": capacity[1], "capacity_points": capacity[2],
                 "fraction": fraction, "rate": rate, "seconds": seconds, "sample_s": sample_s, "baseline_at_s": baseline_at_s,
                 "sent": point.requests_sent, "dropped": point.dropped, "images_per_s": images,
                 "latency_ms": point.latency_ms, "window_throughputs": point.window_throughputs, "window_p99_ms": point.window_p99_ms},
        "capacity_answers": dict(sum((c for c in (capacity_tally or {}).values()), collections.Counter())),
        "kinds": kind_rows(tally),
        "samples": [asdict(s) for s in samples],
        "rest": {"before": asdict(rest_before), "after": asdict(rest_after)},
        "memory": memory_summary(samples, rest_before, rest_after, baseline_at_s),
        "checks": [asdict(c) for c in checks],
        "passed": all(c.passed for c in checks),
    }  # fmt: skip


def markdown(result: dict) -> str:
    """soak.md: the verdict, the load, answers by kind, memory and fds; a pure function of soak.json's dict."""
    passed = result["passed"]
    load = result["load"]
    lines = [
        f"# detserve soak: {'PASS' if passed else 'FAIL'}",
        "",
        f"{result['created']}, {result['machine'].get('cpu_count')} CPUs ({result['machine'].get('cpu_model')}), "
        f"load average {result['machine'].get('loadavg_start')} at start, {result['machine'].get('loadavg_end')} at end.",
        "",
        f"- server: {result['server']['settings']}",
        f"- capacity: {load['capacity_requests_per_s']:.1f} requests/s of this mix "
        f"({load['capacity_images_per_s']:.1f} images/s), closed loop, best of {load['capacity_points']}",
        f"- load: open loop (Poisson) at {load['rate']:.1f} requests/s = {load['fraction']:.0%} of capacity, "
        f"{load['seconds']:.0f} s, {load['sent']} requests ({load['images_per_s']:.1f} images/s answered); "
        f"200s p50 {_fmt(load['latency_ms'].get('p50'))} ms, p99 {_fmt(load['latency_ms'].get('p99'))} ms",
        f"- RSS baseline: the first sample at or after {load['baseline_at_s']:.0f} s of load; fds: at rest (no client connection) before and after",
        "",
        "## Checks",
        "",
        "| check | result | figures |",
        "|---|---|---|",
    ]
    lines += [f"| {c['name']} | {'pass' if c['passed'] else '**FAIL**'} | {c['detail']} |" for c in result["checks"]]
    lines += ["", "## Answers by kind", "", "| kind | what | expected | sent | answers | unexpected |", "|---|---|---|---|---|---|"]
    for row in result["kinds"]:
        lines.append(f"| {row['kind']} | {row['what']} | {row['expected']} | {row['sent']} | {_counts(row['answers']) or '-'} | {row['unexpected']} |")
    mem = result["memory"]
    lines += [
        "",
        "## Memory and file descriptors",
        "",
        "| | replica | proxy |",
        "|---|---|---|",
        f"| pid | {mem['replica']['pid']} | {mem['proxy']['pid']} |",
        f"| RSS at baseline (t={mem['baseline_t_s']} s) | {_mib(mem['replica']['rss_baseline'])} | {_mib(mem['proxy']['rss_baseline'])} |",
        f"| RSS at end (t={mem['end_t_s']} s) | {_mib(mem['replica']['rss_end'])} | {_mib(mem['proxy']['rss_end'])} |",
        f"| RSS max under load | {_mib(mem['replica']['rss_max'])} | {_mib(mem['proxy']['rss_max'])} |",
        f"| RSS trend after baseline | {_fmt(mem['replica']['rss_mib_per_min'], 2)} MiB/min | {_fmt(mem['proxy']['rss_mib_per_min'], 2)} MiB/min |",
        f"| open fds at rest, before -> after | {mem['replica']['fds_rest_before']} -> {mem['replica']['fds_rest_after']} "
        f"| {mem['proxy']['fds_rest_before']} -> {mem['proxy']['fds_rest_after']} |",
        f"| open fds under load, min-max | {mem['replica']['fds_min']}-{mem['replica']['fds_max']} | {mem['proxy']['fds_min']}-{mem['proxy']['fds_max']} |",
        "",
        "Samples (every minute; every 10 s in soak.json):",
        "",
        "| t s | replica RSS | replica fds | proxy RSS | proxy fds |",
        "|---|---|---|---|---|",
    ]
    every = max(1, round(60 / max(result["load"]["sample_s"], 1e-9)))
    samples = result["samples"]
    for s in samples[::every] + ([samples[-1]] if samples and (len(samples) - 1) % every else []):
        lines.append(f"| {s['t_s']:.0f} | {_mib(s['replica_rss'])} | {s['replica_fds']} | {_mib(s['proxy_rss'])} | {s['proxy_fds']} |")
    if result.get("capacity_answers"):
        lines += ["", f"Answers while measuring capacity (not judged): {_counts(result['capacity_answers'])}"]
    return "\n".join(lines) + "\n"


def _fmt(x: float | None, digits: int = 0) -> str:
    return "?" if x is None else f"{x:.{digits}f}"


def memory_summary(samples: Sequence[Sample], rest_before: Sample, rest_after: Sample, baseline_at_s: float) -> dict:
    base, end = baseline_sample(samples, baseline_at_s), last_sample(samples)
    out: dict[str, Any] = {"baseline_t_s": round(base.t_s) if base else None, "end_t_s": round(end.t_s) if end else None}
    for role in ("replica", "proxy"):
        rss = [(s.t_s, getattr(s, f"{role}_rss")) for s in samples if getattr(s, f"{role}_rss") is not None]
        fds = [getattr(s, f"{role}_fds") for s in samples if getattr(s, f"{role}_fds") is not None]
        after_base = [(t, v / 2**20) for t, v in rss if base and t >= base.t_s]
        out[role] = {
            "pid": getattr(rest_before, f"{role}_pid") or next((getattr(s, f"{role}_pid") for s in samples if getattr(s, f"{role}_pid")), None),
            "rss_baseline": getattr(base, f"{role}_rss") if base else None,
            "rss_end": getattr(end, f"{role}_rss") if end else None,
            "rss_max": max((v for _, v in rss), default=None),
            "rss_mib_per_min": slope_per_minute(after_base),
            "fds_rest_before": getattr(rest_before, f"{role}_fds"),
            "fds_rest_after": getattr(rest_after, f"{role}_fds"),
            "fds_min": min(fds, default=None),
            "fds_max": max(fds, default=None),
        }
    return out


def summary_lines(result: dict) -> list[str]:
    """The few lines printed at the end of a run."""
    lines = [f"soak {'PASSED' if result['passed'] else 'FAILED'}: {result['load']['sent']} requests over {result['load']['seconds']:.0f} s "
             f"at {result['load']['rate']:.1f}/s ({result['load']['fraction']:.0%} of {result['load']['capacity_requests_per_s']:.1f}/s)"]  # fmt: skip
    lines += [f"  {'ok  ' if c['passed'] else 'FAIL'} {c['name']}: {c['detail']}" for c in result["checks"]]
    return lines


# --- running it --------------------------------------------------------------------------


def capacity_of(points: Iterable[loadgen.PointResult]) -> tuple[float, float, str]:
    """(requests/s, images/s, which point) of the best closed-loop point: every answer counts, not only 200s."""
    best = (0.0, 0.0, "none")
    for p in points:
        answered = p.ok + sum(p.errors.values())
        rate = answered / p.seconds if p.seconds > 0 else 0.0
        images = ((p.server_stats or {}).get("images") or 0) / p.seconds if p.seconds > 0 else 0.0
        if rate > best[0]:
            best = (rate, images, f"c={p.concurrency}")
    return best


def find_process(prefix: str) -> int | None:
    """The pid of this process's descendant whose title starts with ``prefix`` (Ray titles its workers ``ray::<Actor>``)."""
    import psutil

    for proc in psutil.Process().children(recursive=True):
        try:
            cmd = proc.cmdline()
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
        if cmd and cmd[0].startswith(prefix):
            return proc.pid
    return None


def _process_reading(pid: int | None) -> tuple[int | None, int | None]:
    import psutil

    if pid is None:
        return None, None
    try:
        proc = psutil.Process(pid)
        return proc.memory_info().rss, proc.num_fds()
    except (psutil.NoSuchProcess, psutil.AccessDenied):
        return None, None


class Sampler:
    """Takes a ``Sample``: the replica from its own /stats (pid, rss_bytes, open_fds), the proxy with psutil."""

    def __init__(self, stats_url: str, proxy_pid: int | None, began: float | None = None):
        self.stats_url = loadgen.require_loopback(stats_url)
        self.proxy_pid = proxy_pid
        self.began = time.perf_counter() if began is None else began
        self.samples: list[Sample] = []

    async def read(self, session) -> tuple[Sample, dict | None]:
        stats = None
        try:
            async with session.get(self.stats_url, timeout=_timeout(10)) as response:
                if response.status == 200:
                    stats = await response.json()
        except Exception:
            stats = None
        rss, fds = _process_reading(self.proxy_pid)
        sample = Sample(round(time.perf_counter() - self.began, 1), (stats or {}).get("pid"), (stats or {}).get("rss_bytes"),
                        (stats or {}).get("open_fds"), self.proxy_pid if rss is not None else None, rss, fds)  # fmt: skip
        return sample, stats

    def source(self, session, echo: Callable[[str], None] | None = None) -> loadgen.StatsSource:
        """loadgen's ``stats`` hook, called at every window boundary: record a sample, hand /stats on."""

        async def fetch() -> dict | None:
            sample, stats = await self.read(session)
            self.samples.append(sample)
            if echo:
                echo(f"  t={sample.t_s:5.0f} s  replica RSS {_mib(sample.replica_rss)}, fds {sample.replica_fds}; "
                     f"proxy RSS {_mib(sample.proxy_rss)}, fds {sample.proxy_fds}")  # fmt: skip
            return stats

        return fetch

    async def at_rest(self, settle_s: float = 3.0) -> Sample:
        """A sample with no client connection open: the proxy's fds are then its own, not the load's."""
        async with loadgen.http_session(2) as session:
            sample, _ = await self.read(session)
        await asyncio.sleep(settle_s)  # the proxy closes its side of the connections just closed
        sample.proxy_rss, sample.proxy_fds = _process_reading(self.proxy_pid)
        sample.proxy_pid = self.proxy_pid if sample.proxy_fds is not None else None
        return sample


def _timeout(seconds: float):
    import aiohttp

    return aiohttp.ClientTimeout(total=seconds)


async def measure_capacity(base: str, kinds: Sequence[str], requests: Sequence[HttpRequest], plan: WindowPlan,
                           concurrency: Sequence[int], tally: Tally) -> list[loadgen.PointResult]:  # fmt: skip
    """Closed-loop points over the mix (benchmarks.run's way of finding detserve's capacity)."""
    shapes = [ClosedLoop(c) for c in concurrency]
    async with loadgen.http_session(max(concurrency) + 2, plan.request_timeout_s) as session:
        send = tallying_sender(loadgen.http_sender(session, base, requests, _hook), kinds, tally)
        stats = loadgen.http_stats(session, f"{base}/{APP}/stats")
        return [await loadgen.measure("capacity", send, shape, plan, stats=stats, log=log) for shape in shapes]


def _hook(i: int, status: int, headers, body: bytes) -> loadgen.Status:
    return labelling_hook(status, headers, body)


async def soak_load(base: str, kinds: Sequence[str], requests: Sequence[HttpRequest], rate: float, seconds: float,
                    sample_s: float, sampler: Sampler, tally: Tally, request_timeout_s: float = 60.0,
                    echo: Callable[[str], None] | None = log) -> tuple[loadgen.PointResult, int]:  # fmt: skip
    """Open-loop Poisson load for ``seconds``, one window (and one sample) every ``sample_s``; returns (point, windows planned)."""
    windows = max(1, math.ceil(seconds / sample_s))
    plan = WindowPlan(warmup_s=0.0, window_s=sample_s, min_windows=windows, max_windows=windows, tolerance=1.0,
                      max_requests=int(rate * seconds * 3) + 1000, max_seconds=windows * sample_s + 60,
                      request_timeout_s=request_timeout_s, drain_s=request_timeout_s + 5)  # fmt: skip
    shape = OpenLoop(rate=rate, max_in_flight=256, seed=11)
    sampler.began = time.perf_counter()
    async with loadgen.http_session(shape.max_in_flight + 2, request_timeout_s) as session, loadgen.http_session(2) as stats_session:
        send = tallying_sender(loadgen.http_sender(session, base, requests, _hook), kinds, tally)
        point = await loadgen.measure("soak", send, shape, plan, stats=sampler.source(stats_session, echo), log=echo)
    return point, windows


def run(args: argparse.Namespace) -> tuple[dict, Path]:
    from detserve.benchmarks.run import _loadavg, machine_info, resolve_model, versions
    from detserve.serve.run import shutdown

    stamp = dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    outdir = Path(args.out) / f"soak-{stamp}"
    folder = resolve_model(args.model)
    settings = shipped_settings(args.config, model=str(folder))
    kinds, requests = build_mix(int(settings.args.get("max_body_bytes", 50 * 2**20)), int(settings.args.get("max_images", 64)), f"/{APP}/predict")
    baseline_at_s = min(args.warmup_s, args.seconds / 5)
    result: dict[str, Any] = {
        "schema": 1, "created": dt.datetime.now().astimezone().isoformat(timespec="seconds"),
        "machine": machine_info(), "versions": versions(),
        "server": {"settings": settings.describe(), "args": settings.args, "options": settings.options,
                   "request_timeout_s": settings.request_timeout_s, "config_file": settings.config_file},
        "mix": [{**asdict(k), "expect": k.expect.label} for k in KINDS],
    }  # fmt: skip
    capacity_tally: Tally = {}
    tally: Tally = {}
    began = time.monotonic()
    try:
        base, _ = start_detserve(settings.args, settings.options, request_timeout_s=settings.request_timeout_s,
                                 logging_config=settings.logging_config, app=APP, wait_s=180,
                                 body_limit=int(settings.args.get("max_body_bytes", 50 * 2**20)))  # as `detserve serve` does  # fmt: skip
        log(f"detserve up on {base}/{APP} in {time.monotonic() - began:.0f} s; {settings.describe()}")
        sampler = Sampler(f"{base}/{APP}/stats", find_process("ray::ProxyActor"))

        log(f"== capacity: closed loop over the mix ({len(requests)} requests a cycle), c={','.join(map(str, args.concurrency))}")
        # Short: a capacity within ~10 % is enough to set a 70 % load, and the whole soak has to fit its 12 minutes.
        plan = WindowPlan(warmup_s=2.0, window_s=2.5, max_windows=4, tolerance=0.10, max_requests=2_000, max_seconds=15.0, request_timeout_s=60.0)
        points = asyncio.run(measure_capacity(base, kinds, requests, plan, args.concurrency, capacity_tally))
        capacity, capacity_images, which = capacity_of(points)
        if capacity <= 0:
            raise RuntimeError(f"no request was answered while measuring capacity: {capacity_tally}")
        rate = round(args.fraction * capacity, 2)
        log(f"capacity {capacity:.1f} requests/s ({capacity_images:.1f} images/s) at {which}; soak at {rate:.1f} requests/s for {args.seconds:.0f} s")

        rest_before = asyncio.run(sampler.at_rest())
        log(f"at rest before: replica fds {rest_before.replica_fds}, proxy fds {rest_before.proxy_fds}")
        log(f"== soak: open loop at {rate:.1f} requests/s, a sample every {args.sample_s:g} s")
        point, planned = asyncio.run(soak_load(base, kinds, requests, rate, args.seconds, args.sample_s, sampler, tally))
        rest_after = asyncio.run(sampler.at_rest())
        log(f"at rest after: replica fds {rest_after.replica_fds}, proxy fds {rest_after.proxy_fds}")
    finally:
        shutdown()
        end_own_children()
    result["machine"]["loadavg_end"] = _loadavg()
    result.update(assemble(tally, sampler.samples, rest_before, rest_after, point, planned,
                           capacity=(capacity, capacity_images, which), fraction=args.fraction, rate=rate, seconds=args.seconds,
                           sample_s=args.sample_s, baseline_at_s=baseline_at_s, capacity_tally=capacity_tally))  # fmt: skip
    result["capacity"] = [p.to_dict() for p in points]
    result["total_seconds"] = round(time.monotonic() - began, 1)
    outdir.mkdir(parents=True, exist_ok=True)
    (outdir / "soak.json").write_text(json.dumps(result, indent=2, default=str) + "\n")
    (outdir / "soak.md").write_text(markdown(result))
    return result, outdir


def build_parser(prog: str = "python -m detserve.benchmarks.soak") -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=prog, description="Mixed open-loop load at a share of capacity, watching for unexpected answers, RSS growth and fd leaks (docs/operations.md, Soak).")
    parser.add_argument("--seconds", type=float, default=600.0, help="length of the open-loop load (default 600)")
    parser.add_argument("--fraction", type=float, default=0.7, help="the load as a share of the measured capacity (default 0.7)")
    parser.add_argument("--sample-s", type=float, default=10.0, help="seconds between samples of RSS and fds (default 10)")
    parser.add_argument("--warmup-s", type=float, default=60.0, help="the RSS baseline is the first sample at or after this much load (at most a fifth of --seconds)")
    parser.add_argument("--concurrency", type=lambda s: [int(x) for x in s.split(",")], default=[8, 16], help="closed-loop points for the capacity (default 8,16)")
    parser.add_argument("--config", default=None, help="the Serve config whose yolo application is soaked")
    parser.add_argument("--model", help="export folder (default: the default YOLO, exported once)")
    parser.add_argument("--out", default=str(paths.results_dir()), help="results root (soak-<timestamp>/ is made inside)")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.seconds <= 0 or args.sample_s <= 0 or not 0 < args.fraction <= 1.5:
        raise SystemExit("--seconds and --sample-s must be > 0 and --fraction in (0, 1.5]")
    stop_on_sigterm()
    result, outdir = run(args)
    print()
    print((outdir / "soak.md").read_text())
    for line in summary_lines(result):
        log(line)
    log(f"wrote {outdir / 'soak.json'}, {outdir / 'soak.md'}")
    return 0 if result["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
