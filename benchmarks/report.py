"""Results -> ``results.json``, ``results.md`` (the side-by-side tables) and PNG plots.

The results dict is built by ``benchmarks.run``; everything here is a pure
function of it, so tests can feed a small hand-made one.

    results = {
      "profile", "created", "machine", "versions", "config", "model",
      "raw": [row, ...],                      # benchmarks.raw rows
      "servers": {name: {"kind", "config", "points": [PointResult dict, ...]}},
      "peers": {name: {"status": "ran" | "unavailable" | "failed", "reason", "version", "config", "start_s"}},
      "errors": {stage: message},
    }
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Iterable

from detserve.benchmarks.loadgen import STAGES

#: Above this spread of the load probes (max/min - 1) the report warns that ratios are unreliable.
CALIBRATION_SPREAD = 0.15

#: Server order in tables and plots.
ORDER = ("detserve-http", "detserve-auto-http", "detserve-direct", "detserve-handle", "litserve", "pytriton")
#: Servers that are not detserve: the peers every detserve row is compared with.
PEERS = ("litserve", "pytriton")
PRECISION_COLUMNS = (
    "server", "variant", "mAP50-95", "load", "images/s", "p99 ms", "x fp32 ceiling", "x best peer", "best peer p99 ms", "server CPU ms/img",
)  # fmt: skip

POINT_COLUMNS = (
    "server", "load", "images/s", "p50 ms", "p90 ms", "p95 ms", "p99 ms", "errors",
    "mean batch", "batch sizes", "stable", "client CPU %", "server CPU ms/img",
)  # fmt: skip
RAW_COLUMNS = ("what", "backend", "threads", "batch", "images/s", "ms/image", "p50 ms/call", "p99 ms/call")
STAGE_COLUMNS = ("server", "load", *(f"{s} ms/img" for s in STAGES))
BUDGET_COLUMNS_HEAD = ("p99 budget ms",)


# --- derived numbers --------------------------------------------------------------


def servers_in_order(results: dict) -> list[str]:
    names = list(results.get("servers", {}))
    return sorted(names, key=lambda n: (ORDER.index(n) if n in ORDER else len(ORDER), n))


def ok_points(results: dict, server: str) -> list[dict]:
    """Points that answered something (images/s > 0)."""
    return [p for p in results.get("servers", {}).get(server, {}).get("points", []) if p.get("images_per_s", 0) > 0]


def best_under_budget(points: Iterable[dict], budget_ms: float) -> dict | None:
    """The point with the highest images/s whose p99 is within the budget and that had no errors."""
    fitting = [
        p for p in points if p["latency_ms"].get("p99") is not None and p["latency_ms"]["p99"] <= budget_ms and not p.get("errors")
    ]
    return max(fitting, key=lambda p: p["images_per_s"], default=None)


def raw_best(results: dict, kind: str, threads: int = 1) -> dict | None:
    rows = [r for r in results.get("raw", []) if r["kind"] == kind and r["threads"] == threads and r["backend"].startswith("onnxruntime")]
    return max(rows, key=lambda r: r["images_per_s"], default=None)


def baseline(results: dict) -> dict | None:
    return next((r for r in results.get("raw", []) if r["kind"] == "baseline"), None)


def ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a is not None and b else None


def budgets(results: dict) -> list[float]:
    return list(results.get("config", {}).get("p99_budgets_ms", []))


def budget_table(results: dict) -> list[dict]:
    """Per p99 budget: each server's best images/s within it, and detserve-http's ratio to each other server."""
    names = servers_in_order(results)
    out = []
    for budget in budgets(results):
        best = {n: best_under_budget(ok_points(results, n), budget) for n in names}
        entry: dict[str, Any] = {"budget_ms": budget, "best": {n: (p["images_per_s"] if p else None) for n, p in best.items()}}
        ours = entry["best"].get("detserve-http")
        entry["ratios"] = {n: ratio(ours, entry["best"][n]) for n in names if n != "detserve-http"}
        out.append(entry)
    return out


def ratios(results: dict) -> dict[str, float | None]:
    """The headline ratios (detserve-http's best images/s over the others'), also written to results.json."""
    ours = max((p["images_per_s"] for p in ok_points(results, "detserve-http")), default=None)
    out: dict[str, float | None] = {
        "detserve/ceiling": ratio(ours, max((r["images_per_s"] for r in results.get("raw", []) if r["kind"] == "ceiling"
                                             and r.get("precision", "fp32") == "fp32"), default=None)),
        "detserve/raw_detect": ratio(ours, (raw_best(results, "detect") or {}).get("images_per_s")),
        "detserve/raw_infer": ratio(ours, (raw_best(results, "infer") or {}).get("images_per_s")),
        "detserve/baseline": ratio(ours, (baseline(results) or {}).get("images_per_s")),
    }
    for name in servers_in_order(results):
        if name != "detserve-http":
            theirs = max((p["images_per_s"] for p in ok_points(results, name)), default=None)
            out[f"detserve/{name} (best images/s)"] = ratio(ours, theirs)
    return out


def fp32_ceiling(results: dict) -> dict | None:
    """The no-server ceiling of N processes on the exact (fp32) artifact: what every row's ``x fp32 ceiling`` divides by."""
    rows = [r for r in results.get("raw", []) if r["kind"] == "ceiling" and not r.get("lanes") and r.get("precision", "fp32") == "fp32"]
    return max(rows, key=lambda r: r["images_per_s"], default=None)


def precision_rows(results: dict) -> list[dict]:
    """Per closed-loop point of each server: its variant and mAP, its ratio to the fp32 ceiling and to the best peer at the same load."""
    ceiling = (fp32_ceiling(results) or {}).get("images_per_s")
    accuracy = (results.get("model") or {}).get("map") or {}
    peers = {name: {p["concurrency"]: p for p in ok_points(results, name) if p["load"] == "closed"} for name in PEERS}
    out = []
    for name in servers_in_order(results):
        if name.endswith(("-handle", "-direct")):
            continue
        variant = results["servers"][name].get("variant", "fp32")
        for p in ok_points(results, name):
            if p["load"] != "closed":
                continue
            rivals = [peers[n][p["concurrency"]] for n in PEERS if n != name and p["concurrency"] in peers[n]]
            best = max(rivals, key=lambda q: q["images_per_s"], default=None)
            out.append({
                "server": name, "variant": variant, "map50_95": (accuracy.get(variant) or {}).get("map50_95"),
                "concurrency": p["concurrency"], "images_per_s": p["images_per_s"], "p99_ms": p["latency_ms"].get("p99"),
                "x_fp32_ceiling": ratio(p["images_per_s"], ceiling),
                "x_best_peer": ratio(p["images_per_s"], best["images_per_s"]) if best and name not in PEERS else None,
                "best_peer_p99_ms": best["latency_ms"].get("p99") if best and name not in PEERS else None,
                "server_cpu_ms_per_image": p.get("server_cpu_ms_per_image"),
            })  # fmt: skip
    return out


# --- markdown ----------------------------------------------------------------------


def _fmt(value: Any, digits: int = 1) -> str:
    if value is None:
        return "—"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def _table(columns: Iterable[str], rows: Iterable[Iterable[Any]]) -> str:
    columns = list(columns)
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for r in rows:
        lines.append("| " + " | ".join(_fmt(v) if not isinstance(v, str) else v for v in r) + " |")
    return "\n".join(lines)


def _load_label(p: dict) -> str:
    return f"closed c={p['concurrency']}" if p["load"] == "closed" else f"open {p['rate']:g}/s"


def _histogram(sizes: dict | None) -> str:
    if not sizes:
        return "—"
    return " ".join(f"{k}:{v}" for k, v in sorted(((int(k), v) for k, v in sizes.items())))


def _stable(p: dict) -> str:
    if p.get("capped"):
        return "capped"
    return "yes" if p.get("stable") else "unstable"


def point_rows(results: dict) -> list[list[Any]]:
    rows = []
    for name in servers_in_order(results):
        for p in results["servers"][name].get("points", []):
            s = p.get("server_stats") or {}
            lat = p["latency_ms"]
            errors = ", ".join(f"{k}×{v}" for k, v in sorted(p.get("errors", {}).items())) or "0"
            if p.get("dropped"):
                errors += f" (+{p['dropped']} dropped)"
            rows.append(
                [
                    name, _load_label(p), p["images_per_s"], lat.get("p50"), lat.get("p90"), lat.get("p95"), lat.get("p99"), errors,
                    s.get("mean_batch_size"), _histogram(s.get("batch_sizes")), _stable(p), p.get("client_cpu_pct"),
                    p.get("server_cpu_ms_per_image"),
                ]
            )  # fmt: skip
    return rows


def raw_rows(results: dict) -> list[list[Any]]:
    names = {"infer": "raw engine: infer only", "detect": "raw engine: decode→NMS", "baseline": "baseline: Ultralytics predict",
             "ceiling": "ceiling: N processes, decode→NMS, batch 1 (ms/image = CPU-ms)"}  # fmt: skip
    rows = []
    for r in results.get("raw", []):
        what = names.get(r["kind"], r["kind"])
        if r["kind"] == "ceiling":
            what = what.replace("N processes", f"{r['lanes']} threads, one process" if r.get("lanes") else f"{r.get('processes', '?')} processes")
            if r.get("precision", "fp32") != "fp32":
                what += f", {r['precision']}"
        if r["kind"] == "detect" and r["backend"].startswith("torch"):
            what = "detserve torch backend: decode→NMS"
        rows.append([what, r["backend"], r["threads"], r["batch"], r["images_per_s"], r["ms_per_image"], r["ms_per_call_p50"], r["ms_per_call_p99"]])
    return rows


def stage_rows(results: dict) -> list[list[Any]]:
    rows = []
    for name in servers_in_order(results):
        for p in results["servers"][name].get("points", []):
            per = (p.get("server_stats") or {}).get("stage_ms_per_image") or {}
            if any(v is not None for v in per.values()):
                rows.append([name, _load_label(p), *(per.get(s) for s in STAGES)])
    return rows


def markdown(results: dict) -> str:
    """The whole report: headline ratios, the side-by-side table, raw engine, stages, budgets, peers, machine."""
    out = [f"# detserve benchmark ({results.get('profile', '?')}, {results.get('created', '')})", ""]
    m = results.get("machine", {})
    out.append(
        f"Machine: {m.get('cpu_count')} CPUs ({m.get('cpu_model')}), load average {m.get('loadavg_start')} at start, "
        f"{m.get('loadavg_end')} at end. Model: {results.get('model', {}).get('name')} "
        f"({results.get('model', {}).get('imgsz')} px, {results.get('model', {}).get('source')}). "
        "Client and servers share these cores: read ratios measured in this run, not absolute numbers."
    )
    calibration = results.get("calibration_ms") or {}
    if calibration:
        values = [v for v in calibration.values() if v]
        spread = (max(values) - min(values)) / min(values) if values else 0.0
        out += ["", "Background load check — the raw engine's ms/image (infer, batch 1, 1 thread, median of 1 s) just before each part: "
                + ", ".join(f"{k} {v:.1f}" for k, v in calibration.items()) + f" (spread {100 * spread:.0f} %)."]  # fmt: skip
        if spread > CALIBRATION_SPREAD:
            out.append(
                f"**The machine's background load changed by more than {100 * CALIBRATION_SPREAD:.0f} % during this run: "
                "ratios between servers measured at different times are not trustworthy; re-run, or compare each server's "
                "`engine ms/img` below.**"
            )
    out += ["", "## Headline ratios (detserve over HTTP, best images/s)", ""]
    out.append(_table(("ratio", "value"), [[k, v if v is None else f"{v:.2f}×"] for k, v in ratios(results).items()]))
    out += ["", "## Servers side by side", ""]
    out.append(_table(POINT_COLUMNS, point_rows(results)))
    rows = precision_rows(results)
    if any(r["variant"] != "fp32" for r in rows) or results.get("precision_table"):
        out += ["", "## Precision: detserve fp32 and its gated int8 beside the peers (fp32)", ""]
        sources = sorted({v["on"] for v in ((results.get("model") or {}).get("map") or {}).values()})
        out.append(f"mAP50-95: from the export's accuracy gate, on {'; '.join(sources) or '(no labelled images)'}. "
                   "x fp32 ceiling: images/s over the no-server ceiling of the same run (N processes, fp32). "
                   "x best peer: over the best peer at the same concurrency (the peers run the fp32 graph).")  # fmt: skip
        out.append("")
        out.append(_table(PRECISION_COLUMNS, [[
            r["server"], r["variant"], None if r["map50_95"] is None else f"{r['map50_95']:.4f}", f"closed c={r['concurrency']}",
            r["images_per_s"], r["p99_ms"], None if r["x_fp32_ceiling"] is None else f"{r['x_fp32_ceiling']:.2f}×",
            None if r["x_best_peer"] is None else f"{r['x_best_peer']:.2f}×", r["best_peer_p99_ms"], r["server_cpu_ms_per_image"],
        ] for r in rows]))  # fmt: skip
        table = results.get("precision_table")
        if table:
            names = list(table["ms_per_image"])
            exact = table["exact"]
            out += ["", f"Raw engine, {table['threads']} thread, {table['input']} input, ms per image ({table['rounds']} alternating rounds, median):", ""]
            sizes = sorted({int(b) for c in table["ms_per_image"].values() for b in c})
            cost = lambda n, b: table["ms_per_image"][n].get(b, table["ms_per_image"][n].get(str(b)))  # noqa: E731 - JSON keys are strings
            out.append(_table(("batch", *(f"{n} ms/img" for n in names), *(f"{n} speed-up" for n in names if n != exact)), [
                [b, *(cost(n, b) for n in names), *(f"{cost(exact, b) / cost(n, b):.2f}×" for n in names if n != exact)] for b in sizes
            ]))  # fmt: skip
    out += ["", "## Raw engine (no server) and baseline", ""]
    out.append(_table(RAW_COLUMNS, raw_rows(results)))
    stages = stage_rows(results)
    if stages:
        out += ["", "## Where the time goes (server-side ms per image, from /stats diffs)", ""]
        out.append(_table(STAGE_COLUMNS, stages))
    table = budget_table(results)
    if table:
        names = servers_in_order(results)
        others = [n for n in names if n != "detserve-http"]
        cols = (*BUDGET_COLUMNS_HEAD, *(f"{n} img/s" for n in names), *(f"detserve/{n}" for n in others))
        rows = [[e["budget_ms"], *(e["best"][n] for n in names), *(None if e["ratios"][n] is None else f"{e['ratios'][n]:.2f}×" for n in others)] for e in table]
        out += ["", "## Best images/s within a p99 budget (points with no errors)", ""]
        out.append(_table(cols, rows))
    peers = results.get("peers", {})
    if peers:
        out += ["", "## Peers", ""]
        rows = []
        for name, info in peers.items():
            status = info.get("status", "?")
            detail = info.get("reason") or ""
            rows.append([name, status, info.get("version") or "—", (info.get("config") or {}).get("settings", "—"), _fmt(info.get("start_s")), detail.replace("\n", " ")[:300] or "—"])
        out.append(_table(("peer", "status", "version", "configuration", "start s", "why not"), rows))
    errors = results.get("errors") or {}
    if errors:
        out += ["", "## Errors", ""]
        out += [f"- {k}: {str(v).splitlines()[0][:300]}" for k, v in errors.items()]
    out.append("")
    return "\n".join(out)


# --- files ------------------------------------------------------------------------


def write_json(results: dict, path: Path) -> Path:
    path.write_text(json.dumps(results, indent=1, default=str) + "\n")
    return path


def plots(results: dict, outdir: Path) -> list[Path]:
    """throughput-vs-p99.png (one line per server over its closed-loop points) and batch-sizes.png."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    names = servers_in_order(results)
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for i, name in enumerate(names):
        colour = f"C{i}"
        points = sorted((p for p in ok_points(results, name) if p["load"] == "closed"), key=lambda p: p["concurrency"])
        if points:
            xs = [p["latency_ms"]["p99"] for p in points]
            ys = [p["images_per_s"] for p in points]
            ax.plot(xs, ys, marker="o", color=colour, label=name)
            for p, x, y in zip(points, xs, ys):
                ax.annotate(f"c={p['concurrency']}", (x, y), fontsize=7, xytext=(3, 3), textcoords="offset points")
        opens = [p for p in ok_points(results, name) if p["load"] == "open"]
        if opens:
            ax.scatter([p["latency_ms"]["p99"] for p in opens], [p["images_per_s"] for p in opens], marker="x", color=colour,
                       label=f"{name} (open loop)")  # fmt: skip
    ceiling = raw_best(results, "detect")
    if ceiling:
        ax.axhline(ceiling["images_per_s"], linestyle="--", color="grey", linewidth=1, label=f"raw decode→NMS, 1 thread, batch {ceiling['batch']}")
    base = baseline(results)
    if base:
        ax.axhline(base["images_per_s"], linestyle=":", color="black", linewidth=1, label="baseline Ultralytics predict")
    ax.set_xlabel("p99 latency (ms)")
    ax.set_ylabel("images/s")
    ax.set_title("Throughput vs p99 latency (closed loop, shared 2-core machine)")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=7)
    written.append(_save(fig, outdir / "throughput-vs-p99.png"))

    # Batch sizes formed at each server's highest-concurrency closed-loop point (share of images).
    fig, ax = plt.subplots(figsize=(7, 4))
    shown = []
    for name in names:
        closed = [p for p in ok_points(results, name) if p["load"] == "closed" and (p.get("server_stats") or {}).get("batch_sizes")]
        if closed:
            shown.append((name, max(closed, key=lambda p: p["concurrency"])))
    sizes = sorted({int(k) for _, p in shown for k in p["server_stats"]["batch_sizes"]})
    width = 0.8 / max(1, len(shown))
    for i, (name, p) in enumerate(shown):
        hist = {int(k): v for k, v in p["server_stats"]["batch_sizes"].items()}
        images = sum(k * v for k, v in hist.items()) or 1
        ax.bar([j + i * width for j in range(len(sizes))], [k * hist.get(k, 0) / images for k in sizes], width,
               color=f"C{names.index(name)}", label=f"{name} (c={p['concurrency']})")  # fmt: skip
    ax.set_xticks([j + width * (len(shown) - 1) / 2 for j in range(len(sizes))], [str(s) for s in sizes])
    ax.set_xlabel("batch size formed")
    ax.set_ylabel("share of images")
    ax.set_title("Batches formed by each server")
    if shown:
        ax.legend(fontsize=7)
    written.append(_save(fig, outdir / "batch-sizes.png"))
    return written


def _save(fig, path: Path) -> Path:
    import matplotlib.pyplot as plt

    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def show(markdown: str, written: Iterable[Path]) -> None:
    """The end of a run: its report on stdout, then the files it wrote."""
    print()
    print(markdown)
    print(f"wrote {', '.join(str(p) for p in written)}", flush=True)


def write_all(results: dict, outdir: Path) -> dict[str, Path]:
    """results.json, results.md and the plots into ``outdir``; returns their paths."""
    outdir.mkdir(parents=True, exist_ok=True)
    results.setdefault("ratios", ratios(results))
    results.setdefault("budgets", budget_table(results))
    results.setdefault("precision", precision_rows(results))
    files = {"json": write_json(results, outdir / "results.json")}
    md = outdir / "results.md"
    md.write_text(markdown(results))
    files["markdown"] = md
    try:
        for p in plots(results, outdir):
            files[p.stem] = p
    except Exception as exc:  # plots are a nicety; the numbers are in the JSON and markdown
        results.setdefault("errors", {})["plots"] = f"{type(exc).__name__}: {exc}"
        write_json(results, outdir / "results.json")
    return files
