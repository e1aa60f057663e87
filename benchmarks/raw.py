"""The ceiling and the baseline, with no server in the way.

- ``engine_rows``: detserve's onnxruntime engine alone (``Detector.infer`` on
  already preprocessed batches) and the whole path (``Detector.detect`` from
  JPEG bytes: decode -> letterbox -> engine -> NMS) at batch 1/2/4/8 and 1/2
  intra-op threads. What a server could reach if serving cost nothing.
- ``baseline_rows``: what users run today, Ultralytics ``YOLO(source.pt).predict``
  one image at a time in eager PyTorch (``torch.set_num_threads(1)``: on 2 busy
  cores more threads collapse), from the same JPEG bytes.
- ``torch_backend_rows``: detserve's own PyTorch backend (the source model,
  eager) through the same stages, next to onnxruntime.

Each measurement runs for at least ``seconds`` and ``min_iters`` calls, after
``warmup`` calls that are not counted.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Callable, Sequence

from detserve.benchmarks.loadgen import percentile
from detserve.benchmarks.peers import dist_version


def time_calls(fn: Callable[[], object], *, seconds: float, min_iters: int = 3, warmup: int = 1, max_iters: int = 10_000) -> list[float]:
    """Seconds per call of ``fn``: ``warmup`` calls dropped, then until both ``seconds`` and ``min_iters`` are reached."""
    for _ in range(warmup):
        fn()
    times: list[float] = []
    began = time.perf_counter()
    while len(times) < max_iters and (len(times) < min_iters or time.perf_counter() - began < seconds):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return times


def row(kind: str, backend: str, threads: int, batch: int, times: Sequence[float], cpu_s: float | None = None) -> dict:
    """One result row: per-call latency percentiles, per-image cost, images/s over the whole run."""
    total = sum(times)
    return {
        "kind": kind,
        "backend": backend,
        "threads": threads,
        "batch": batch,
        "iters": len(times),
        "ms_per_call_p50": round(1000 * percentile(times, 50), 3),
        "ms_per_call_p99": round(1000 * percentile(times, 99), 3),
        "ms_per_image": round(1000 * total / (len(times) * batch), 3),
        "images_per_s": round(len(times) * batch / total, 3),
        "cpu_pct": round(100 * cpu_s / total, 1) if cpu_s is not None else None,
    }


def _measured(kind: str, backend: str, threads: int, batch: int, fn: Callable[[], object], seconds: float, warmup: int = 1) -> dict:
    cpu0 = time.process_time()
    wall0 = time.perf_counter()
    times = time_calls(fn, seconds=seconds, warmup=warmup)
    # CPU share over the timed part only is not separable from warm-up; scale by wall fractions.
    wall = time.perf_counter() - wall0
    cpu = (time.process_time() - cpu0) * (sum(times) / wall) if wall > 0 else None
    return row(kind, backend, threads, batch, times, cpu)


def engine_rows(
    folder: Path,
    payloads: Sequence[bytes],
    *,
    batch_sizes: Sequence[int] = (1, 2, 4, 8),
    threads: Sequence[int] = (1, 2),
    seconds: float = 2.0,
    log: Callable[[str], None] = print,
) -> list[dict]:
    """onnxruntime: ``infer`` on preprocessed batches, and ``detect`` from JPEG bytes, per batch size and thread count."""
    from detserve.runtime.detector import Detector
    from detserve.runtime.preprocess import pack_inputs

    rows = []
    for t in threads:
        detector = Detector(folder, backend="onnxruntime", device="cpu", threads=t)
        detector.warmup()
        params = detector.params()
        images = [detector.decode(p) for p in payloads]
        for b in batch_sizes:
            batch_bytes = [payloads[i % len(payloads)] for i in range(b)]
            # One shape per engine call (a rect letterbox gives each aspect ratio its own): the first image b times.
            inputs = pack_inputs([detector.prepare(images[0])] * b, detector.manifest.input)
            r = _measured("infer", detector.engine.name, t, b, lambda: detector.engine.run(*inputs), seconds)
            rows.append(r)
            log(f"  raw infer  threads={t} batch={b}: {r['ms_per_image']:.1f} ms/image, {r['images_per_s']:.1f} images/s")
            r = _measured("detect", detector.engine.name, t, b, lambda: detector.detect(batch_bytes, params), seconds)
            rows.append(r)
            log(f"  raw detect threads={t} batch={b}: {r['ms_per_image']:.1f} ms/image, {r['images_per_s']:.1f} images/s")
    return rows


def _detect_loop(folder: str, payload_dir: str, seconds: float, start_at: float, precision: str = "fp32") -> tuple[int, float, float]:
    """One ceiling process: ``Detector.detect`` on one image at a time, from ``start_at`` for ``seconds``."""
    from detserve.runtime.detector import Detector

    payloads = [p.read_bytes() for p in sorted(Path(payload_dir).iterdir())]
    detector = Detector(Path(folder), backend="onnxruntime", device="cpu", threads=1, precision=precision)
    detector.warmup()
    params = detector.params()
    detector.detect([payloads[0]], params)
    while time.time() < start_at:
        time.sleep(0.01)
    done, cpu0, began = 0, time.process_time(), time.perf_counter()
    while time.perf_counter() - began < seconds:
        detector.detect([payloads[done % len(payloads)]], params)
        done += 1
    return done, time.perf_counter() - began, time.process_time() - cpu0


def ceiling_rows(folder: Path, payloads: Sequence[bytes], *, processes: int = 2, seconds: float = 5.0,
                 log: Callable[[str], None] = print, precision: str = "fp32") -> list[dict]:  # fmt: skip
    """The ceiling: ``processes`` processes, each decode -> letterbox -> engine -> NMS on one image at a time, no server.

    Processes, not threads: nothing shared, no GIL, what a server with that many
    workers could reach if serving cost nothing. They start together and run
    for the same ``seconds``; the row is their summed images/s. Plain
    subprocesses (multiprocessing would leave its resource tracker running).
    Then the same with threads sharing one engine in this process (fp32 only).
    ``precision``: which variant every process runs (``int8``: the export's gated int8 variant).
    """
    import json
    import subprocess
    import sys
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        for i, data in enumerate(payloads):
            (Path(tmp) / f"{i:04d}.jpg").write_bytes(data)
        start_at = time.time() + 10.0  # start + model load before the common start
        code = ("import json, sys; from detserve.benchmarks.raw import _detect_loop; "
                "print(json.dumps(_detect_loop(sys.argv[1], sys.argv[2], float(sys.argv[3]), float(sys.argv[4]), sys.argv[5])))")  # fmt: skip
        procs = [subprocess.Popen([sys.executable, "-c", code, str(folder), tmp, str(seconds), str(start_at), precision], stdout=subprocess.PIPE, text=True)
                 for _ in range(processes)]  # fmt: skip
        parts = []
        for p in procs:
            out, _ = p.communicate(timeout=seconds + 120)
            if p.returncode:
                raise RuntimeError(f"a ceiling process failed (exit {p.returncode})")
            parts.append(json.loads(out.strip().splitlines()[-1]))
    images = sum(d for d, _, _ in parts)
    wall = max(w for _, w, _ in parts)
    cpu = sum(c for _, _, c in parts)
    r = {
        "kind": "ceiling", "backend": "onnxruntime-cpu", "threads": 1, "batch": 1, "processes": processes,
        "iters": images, "ms_per_call_p50": None, "ms_per_call_p99": None,
        "ms_per_image": round(1000 * cpu / max(1, images), 3),  # CPU-ms per image
        "images_per_s": round(images / wall, 3), "cpu_pct": round(100 * cpu / wall, 1), "precision": precision,
    }  # fmt: skip
    log(f"  ceiling {processes} processes, batch 1, {precision}: {r['images_per_s']:.1f} images/s, {r['ms_per_image']:.1f} CPU-ms/image")
    if precision != "fp32":
        return [r]
    return [r, _threads_ceiling(folder, payloads, processes, seconds, log)]


def _threads_ceiling(folder: Path, payloads: Sequence[bytes], threads: int, seconds: float, log: Callable[[str], None]) -> dict:
    """The same loops as threads of this process sharing one engine (onnxruntime releases the GIL while it runs)."""
    import threading

    from detserve.runtime.detector import Detector

    detector = Detector(folder, backend="onnxruntime", device="cpu", threads=1)
    detector.warmup()
    params = detector.params()
    counts = [0] * threads
    cpu0 = time.process_time()
    began = time.perf_counter()
    stop = began + seconds

    def loop(i: int) -> None:
        while time.perf_counter() < stop:
            detector.detect([payloads[counts[i] % len(payloads)]], params)
            counts[i] += 1

    workers = [threading.Thread(target=loop, args=(i,)) for i in range(threads)]
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    wall, cpu, images = time.perf_counter() - began, time.process_time() - cpu0, sum(counts)
    r = {
        "kind": "ceiling", "backend": detector.engine.name, "threads": 1, "batch": 1, "processes": 1, "lanes": threads,
        "iters": images, "ms_per_call_p50": None, "ms_per_call_p99": None,
        "ms_per_image": round(1000 * cpu / max(1, images), 3), "images_per_s": round(images / wall, 3),
        "cpu_pct": round(100 * cpu / wall, 1),
    }  # fmt: skip
    log(f"  ceiling {threads} threads, one engine, batch 1: {r['images_per_s']:.1f} images/s, {r['ms_per_image']:.1f} CPU-ms/image")
    return r


def baseline_rows(folder: Path, payloads: Sequence[bytes], *, seconds: float = 3.0, log: Callable[[str], None] = print) -> list[dict]:
    """Ultralytics ``YOLO(source.pt).predict``, one image per call, eager PyTorch with one thread."""
    import torch

    from detserve.runtime.detector import Detector
    from detserve.runtime.images import decode
    from detserve.runtime.manifest import read_manifest, verify_artifact
    from detserve.export.reference import yolo_predict

    manifest = read_manifest(folder)
    if manifest.family != "yolo":
        return []
    torch.set_num_threads(1)
    from ultralytics import YOLO

    model = YOLO(str(verify_artifact(folder, manifest, which="source")))
    params = Detector.params(_Defaults(manifest))  # the manifest's conf / iou / max_det
    counter = iter(range(10**9))

    def one() -> None:
        data = payloads[next(counter) % len(payloads)]
        yolo_predict(model, [decode(data)], imgsz=manifest.input.imgsz, conf=params.conf, iou=params.iou, max_det=params.max_det)

    r = _measured("baseline", f"ultralytics-{dist_version('ultralytics')}-torch-eager", 1, 1, one, seconds, warmup=2)
    log(f"  baseline ultralytics predict (torch threads=1): {r['ms_per_image']:.1f} ms/image, {r['images_per_s']:.1f} images/s")
    return [r]


def torch_backend_rows(
    folder: Path, payloads: Sequence[bytes], *, batch_sizes: Sequence[int] = (1, 8), seconds: float = 2.0, log: Callable[[str], None] = print
) -> list[dict]:
    """detserve's PyTorch backend (one thread) through the same ``detect`` path as the onnxruntime rows."""
    import torch

    from detserve.runtime.detector import Detector

    torch.set_num_threads(1)
    detector = Detector(folder, backend="torch", device="cpu", threads=1)
    detector.warmup()
    params = detector.params()
    rows = []
    for b in batch_sizes:
        batch_bytes = [payloads[i % len(payloads)] for i in range(b)]
        r = _measured("detect", detector.engine.name, 1, b, lambda: detector.detect(batch_bytes, params), seconds)
        rows.append(r)
        log(f"  detserve torch backend detect batch={b}: {r['ms_per_image']:.1f} ms/image, {r['images_per_s']:.1f} images/s")
    return rows


def precision_table(folder: Path, *, batch_sizes: Sequence[int] = (1, 2, 4, 8), rounds: int = 5,
                    log: Callable[[str], None] = print) -> dict | None:  # fmt: skip
    """The raw engine, 1 thread: ms per image of the exact artifact and of each gated CPU variant, per batch size.

    One engine each, timed in alternating rounds (``runtime.variants.time_engines``, what ``precision: auto``
    runs at start, with more rounds) on a full-size input; None when the folder has no gated CPU variant.
    """
    from detserve.runtime import variants as variantlib
    from detserve.runtime.detector import engine_runner
    from detserve.runtime.engines import load_engine
    from detserve.runtime.manifest import read_manifest

    manifest = read_manifest(folder)
    pool = variantlib.candidates(manifest, "cpu")
    if len(pool) < 2:
        return None
    runs = {c.name: engine_runner(load_engine(folder, backend="onnxruntime", device="cpu", threads=1, manifest=c.manifest), c.manifest)
            for c in pool}  # fmt: skip
    costs = variantlib.time_engines(runs, list(batch_sizes), rounds=rounds)
    exact = pool[0].name
    for b in batch_sizes:
        log(f"  raw engine, 1 thread, batch {b}: " + ", ".join(f"{n} {c[b]:.1f} ms/image" for n, c in costs.items())
            + "".join(f" ({costs[exact][b] / c[b]:.2f}x {n})" for n, c in costs.items() if n != exact))  # fmt: skip
    side = variantlib.timing_input(manifest).shape[0]
    return {"input": f"{side}x{side}", "threads": 1, "rounds": rounds, "exact": exact, "ms_per_image": costs}


class LoadProbe:
    """A 1-thread engine call on one preprocessed image, timed for a second: how busy the machine is right now.

    The servers run one after another; the run probes before each, so a change
    in background load between them shows up in the report instead of hiding in
    the ratios.
    """

    def __init__(self, folder: Path, payload: bytes):
        from detserve.runtime.detector import Detector
        from detserve.runtime.preprocess import pack_inputs

        self.detector = Detector(folder, backend="onnxruntime", device="cpu", threads=1)
        prepared = [self.detector.prepare(self.detector.decode(payload))]
        self.inputs = pack_inputs(prepared, self.detector.manifest.input)
        self.detector.engine.run(*self.inputs)

    def ms_per_image(self, seconds: float = 1.0) -> float:
        times = time_calls(lambda: self.detector.engine.run(*self.inputs), seconds=seconds, min_iters=5, warmup=1)
        return round(1000 * percentile(times, 50), 2)


class _Defaults:
    """Just enough of a Detector for ``Detector.params`` (the manifest's defaults) without loading an engine."""

    def __init__(self, manifest):
        self.manifest = manifest

