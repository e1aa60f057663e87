"""``python -m detserve.benchmarks --adapter DIR``: a Dataloop adapter as written against its accelerated export, in one run.

Same machine, same JPEGs (``payloads.jpeg_payloads``: generated scenes), same
closed loop (8 clients by default), on one embedded Ray:

- ``adapter``: the folder's model served through its own ``prepare_item_func``
  and ``predict`` (one predict thread, as its compute config says);
- ``accelerated``: the export ``detserve export --adapter`` made of its weights
  (made here first when missing), on detserve's engine.

Both are served at once, one replica each (1 of the Ray's 4 logical CPUs: the 2
cores are shared the same way as for one app), and measured in turn,
``rounds`` times (adapter, accelerated, adapter, ...): the spread of a side's
rounds is the noise the ratio is read against, on a machine others share.
Writes ``bench-results/<stamp>-adapter/results.json`` and prints a table.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import json
import statistics
import time
from pathlib import Path

from detserve.benchmarks import loadgen, payloads as bench_payloads
from detserve.benchmarks.loadgen import ClosedLoop, WindowPlan

#: Each point: 3 s warm-up, then 4 s windows until 3 agree within 10 % (at most 6).
PLAN = WindowPlan(warmup_s=3.0, window_s=4.0, max_windows=6, tolerance=0.10, max_requests=20_000, max_seconds=40.0)
#: One replica of one CPU each: the same share of the machine for both sides.
OPTIONS = {"num_replicas": 1, "autoscaling_config": None, "ray_actor_options": {"num_cpus": 1}}


def log(message: str) -> None:
    print(message, flush=True)


def run(folder: Path, model: str | None, *, concurrency: int = 8, rounds: int = 2, out_root: Path) -> dict:
    from ray import serve

    from detserve.adapters.dataloop_app import accelerated_problem, export_folder, read_app
    from detserve.benchmarks.ports import free_port
    from detserve.benchmarks.run import machine_info, versions
    from detserve.benchmarks.server import shipped_settings
    from detserve.serve.app import application
    from detserve.serve.run import shutdown, start_ray

    app = read_app(folder)
    entry = app.model(model)
    export = export_folder(app, entry)
    if accelerated_problem(export):
        from detserve.adapters.accelerate import accelerate

        log(f"exporting {entry.name}'s weights to {export} (detserve export --adapter)")
        accelerate(folder, entry.name, out=export, force=True, quiet=True)
    payloads = bench_payloads.jpeg_payloads(32)
    log(f"serving {entry.name} as written and accelerated ({export})")
    sides = {
        "adapter": {"adapter": str(app.folder), "model": entry.name},
        "accelerated": {"adapter": str(app.folder), "model": entry.name, "accelerated": True},
    }
    results: dict = {
        "created": dt.datetime.now().astimezone().isoformat(timespec="seconds"),
        "machine": machine_info(),
        "versions": versions(),
        "adapter": {"folder": str(app.folder), "model": entry.name, "class": entry.class_name, "export": str(export)},
        "config": {"concurrency": concurrency, "rounds": rounds, "plan": PLAN.__dict__, "options": OPTIONS,
                   "payloads": {"count": len(payloads), "source": "detserve.training.synthetic.scenes(32, seed=7) as JPEG q90"}},
        "points": {name: [] for name in sides},
    }  # fmt: skip
    port = free_port()
    start_ray(4)  # logical CPUs: two replicas of 1, and room for Serve's own actors
    try:
        logging_config = shipped_settings().logging_config
        serve.start(http_options={"host": "127.0.0.1", "port": port, "request_timeout_s": 30}, proxy_location="HeadOnly", logging_config=logging_config)
        for name, args in sides.items():
            serve.run(application(args, OPTIONS), name=name, route_prefix=f"/{name}", blocking=False, logging_config=logging_config)
        base = f"http://127.0.0.1:{port}"
        for round_ in range(rounds):
            for name in sides:
                requests = [loadgen.HttpRequest(f"/{name}/predict", p, (("Content-Type", "image/jpeg"),)) for p in payloads]
                [point] = asyncio.run(loadgen.measure_http(f"{name} (round {round_ + 1})", base, requests, [ClosedLoop(concurrency)], PLAN,
                                                           stats_url=f"{base}/{name}/stats", log=log))  # fmt: skip
                results["points"][name].append(point.to_dict())
    finally:
        shutdown()
    results["summary"] = summary(results["points"])
    stamp = dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    out = out_root / f"{stamp}-adapter"
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(results, indent=1) + "\n")
    results["file"] = str(out / "results.json")
    return results


def summary(points: dict[str, list[dict]]) -> dict:
    """Images/s per side (median of rounds, and its range), the ratio accelerated / adapter per round and overall."""
    out: dict = {}
    for name, rows in points.items():
        rates = [row["images_per_s"] for row in rows]
        out[name] = {"images_per_s": round(statistics.median(rates), 2), "range": [round(min(rates), 2), round(max(rates), 2)],
                     "p50_ms": [row["latency_ms"]["p50"] for row in rows], "p99_ms": [row["latency_ms"]["p99"] for row in rows],
                     "errors": [row["errors"] for row in rows]}  # fmt: skip
    pairs = zip(points["adapter"], points["accelerated"])
    ratios = [b["images_per_s"] / a["images_per_s"] for a, b in pairs if a["images_per_s"]]
    out["ratio_by_round"] = [round(r, 2) for r in ratios]
    out["ratio"] = round(out["accelerated"]["images_per_s"] / out["adapter"]["images_per_s"], 2) if out["adapter"]["images_per_s"] else None
    return out


def table(results: dict) -> str:
    s = results["summary"]
    lines = [f"{results['adapter']['model']} ({results['adapter']['class']}), closed loop c={results['config']['concurrency']}, "
             f"{results['config']['rounds']} rounds, {results['machine'].get('cpu_count')} CPUs", "",
             "| side | images/s (median) | range over rounds | p50 ms | p99 ms |", "|---|---|---|---|---|"]  # fmt: skip
    for name in ("adapter", "accelerated"):
        row = s[name]
        lines.append(f"| {name} | {row['images_per_s']} | {row['range'][0]}-{row['range'][1]} | {row['p50_ms']} | {row['p99_ms']} |")
    lines += ["", f"accelerated / adapter: {s['ratio']}x (by round: {s['ratio_by_round']})"]
    return "\n".join(lines)


def main(folder: str, model: str | None, concurrency: int, out_root: Path) -> int:
    began = time.monotonic()
    results = run(Path(folder), model, concurrency=concurrency, out_root=out_root)
    print()
    print(table(results))
    print(f"\nwrote {results['file']} in {time.monotonic() - began:.0f} s")
    errors = [e for rows in results["summary"].values() if isinstance(rows, dict) for e in rows.get("errors", []) if e]
    return 1 if errors else 0
