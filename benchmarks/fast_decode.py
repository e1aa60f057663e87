"""What ``fast_decode`` buys and costs: decode time, box parity with the exact path, and mAP (issue 12, item 5).

    python -m detserve.benchmarks.fast_decode [--model DIR] [--scenes 24]

The held-out scenes (``training.recipes`` EVAL_SEED) are upscaled to 3, 6 and
12 MP photos (JPEG, quality 90) — generated pictures, not camera photos: they
have the sizes of real photos, not their texture. For each size it reports the
median decode + prepare time on both paths, the share of the exact path's boxes
that the fast path gives too (``export.parity.compare``: one to one, same
class, IoU >= 0.99, the export threshold, and >= 0.9), and each path's mAP50-95 against the ground truth. Writes
``bench-results/fast-decode-<timestamp>.json`` and prints a Markdown table.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import numpy as np

from detserve.runtime import offline, paths

offline.apply()

from PIL import Image  # noqa: E402

from detserve.benchmarks.payloads import at_megapixels, encode  # noqa: E402
from detserve.export.parity import compare  # noqa: E402
from detserve.runtime.detector import Detector  # noqa: E402
from detserve.runtime.images import Limits  # noqa: E402
from detserve.serve.batching import prepare  # noqa: E402
from detserve.training import synthetic  # noqa: E402
from detserve.training.metrics import ImageBoxes, coco_metrics  # noqa: E402
from detserve.training.recipes import EVAL_SEED  # noqa: E402

MEGAPIXELS = (3, 6, 12)


def measure(detector: Detector, n_scenes: int) -> list[dict]:
    params, limits = detector.params(), Limits(max_pixels=200_000_000, max_bytes=1 << 30)
    labels = [detector.labels[k] for k in sorted(detector.labels)]
    rows = []
    for mp in MEGAPIXELS:
        times = {"exact": [], "fast": []}
        match = {0.99: [0, 0], 0.9: [0, 0]}
        truth, found = [], {"exact": [], "fast": []}
        for scene in synthetic.scenes(n_scenes, EVAL_SEED):
            h, w = scene.image.shape[:2]
            size = at_megapixels(scene.image, mp)
            data = encode(scene.image, size=size, resample=Image.BILINEAR, quality=90)
            dets = {}
            for path in ("exact", "fast"):
                start = time.perf_counter()
                item = prepare(detector, data, limits, fast_decode=path == "fast")
                times[path].append(time.perf_counter() - start)
                [dets[path]] = detector.run([item.prepared], params)
                found[path].append(ImageBoxes(dets[path].boxes, [labels[c] for c in dets[path].class_ids], dets[path].scores, size[0], size[1]))
            for iou_min, counts in match.items():  # the export's own matching: one to one, same class
                parity = compare(dets["exact"], dets["fast"], iou_min)
                counts[0] += parity.matched
                counts[1] += parity.source_boxes
            sx, sy = size[0] / w, size[1] / h
            truth.append(ImageBoxes(scene.boxes * np.array([sx, sy, sx, sy], np.float32), [synthetic.CLASSES[c] for c in scene.classes], None, size[0], size[1]))
        maps = {path: coco_metrics(truth, found[path], labels).map50_95 for path in found}
        rows.append({
            "megapixels": mp,
            "decode_ms_exact": 1000 * statistics.median(times["exact"]),
            "decode_ms_fast": 1000 * statistics.median(times["fast"]),
            "speedup": statistics.median(times["exact"]) / statistics.median(times["fast"]),
            "boxes": match[0.99][1],
            "matched_iou99": match[0.99][0] / max(1, match[0.99][1]),
            "matched_iou90": match[0.9][0] / max(1, match[0.9][1]),
            "map50_95_exact": maps["exact"],
            "map50_95_fast": maps["fast"],
        })  # fmt: skip
    return rows


def table(rows: list[dict]) -> str:
    lines = [
        "| photo | decode+prepare exact ms | fast ms | speed-up | boxes matched (IoU≥0.99 / ≥0.9) | mAP50-95 exact → fast |",
        "|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['megapixels']} MP | {r['decode_ms_exact']:.1f} | {r['decode_ms_fast']:.1f} | {r['speedup']:.2f}x | "
            f"{r['matched_iou99']:.1%} / {r['matched_iou90']:.1%} of {r['boxes']} | {r['map50_95_exact']:.4f} → {r['map50_95_fast']:.4f} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", type=Path, default=None, help="export folder (default: the default YOLO)")
    parser.add_argument("--scenes", type=int, default=24)
    parser.add_argument("--out", type=Path, default=paths.results_dir())
    args = parser.parse_args(argv)
    if args.model is None:
        from detserve.export.defaults import ensure_default_models

        args.model = ensure_default_models(("yolo",))["yolo"]
    detector = Detector(args.model, threads=1)
    rows = measure(detector, args.scenes)
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / f"fast-decode-{time.strftime('%Y%m%d-%H%M%S')}.json"
    path.write_text(json.dumps({"model": str(args.model), "imgsz": detector.manifest.input.imgsz, "scenes": args.scenes, "rows": rows}, indent=1))
    print(table(rows))
    print(f"\n(written to {path})")


if __name__ == "__main__":
    main()
