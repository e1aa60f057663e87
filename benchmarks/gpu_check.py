"""One GPU check for the device path (issue 13): run once on the GPU machine, read, fix, run again.

    python benchmarks/gpu_check.py --model artifacts/gpu-check/yolo --out gpu-check   (or `make gpu-check`)

Needs only torch, torchvision, numpy, pillow and opencv (no Ultralytics, Ray,
dtlpy or pydantic): the model is the export folder's ``model.pt2`` (a
``torch.export`` program, written by ``detserve export --pod gpu-*``), read with
plain torch, and the manifest is read as JSON. It imports only
``detserve.runtime.{device, gpu_decode, images, postprocess, preprocess}``;
run from a checkout without ``pip install`` it maps the repository's folders
into the ``detserve`` namespace itself. ``--cpu-smoke`` runs every section on
the CPU at toy sizes (what CI does, to catch a broken script before the
GPU's few minutes). Without CUDA (and without ``--cpu-smoke``) it says so and
exits 0 having measured nothing.

Writes ``gpu_check.json`` and ``gpu_check.md`` in ``--out``:
engine-only images/s at batch 1/8/32/128 (eager fp16 channels-last, CUDA
graphs, torch.compile), GPU memory per batch, end-to-end JPEG bytes -> boxes
(CPU decode with 16 threads vs nvJPEG) on 640x480 and 810x1080 sets, parity of
the device path against the CPU reference (numpy letterbox + fp32 program on
the CPU + the runtime's NMS), and Faster R-CNN batch scaling.
"""

from __future__ import annotations

import argparse
import importlib.util
import io
import json
import platform
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

# The one place outside runtime/paths.py that finds the checkout itself: this script runs as a file on a
# machine where detserve is not installed, so it must locate the packages before it can import any of them.
CHECKOUT = Path(__file__).resolve().parent.parent
BUDGET_S = 7 * 60  # the whole check must end inside 8 minutes on the GPU machine


def _map_namespace() -> None:
    """Make ``detserve.runtime`` importable from a plain checkout (the GPU machine has no editable install)."""
    if importlib.util.find_spec("detserve") is not None:
        return
    for name, folder in (("detserve", "detserve"), ("detserve.runtime", "runtime")):
        spec = importlib.util.spec_from_file_location(name, CHECKOUT / folder / "__init__.py", submodule_search_locations=[str(CHECKOUT / folder)])
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)


def no_cuda_message() -> str | None:
    import torch

    if not torch.cuda.is_available():
        return "no CUDA GPU visible (torch.cuda.is_available() is False): nothing was measured"
    return None


# -- pieces ----------------------------------------------------------------------


def sync(device):
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn, device, iters: int) -> float:
    """Seconds per call, after one warm-up call."""
    fn()
    sync(device)
    start = time.perf_counter()
    for _ in range(iters):
        fn()
    sync(device)
    return (time.perf_counter() - start) / iters


def make_jpegs(n: int, w: int, h: int, seed: int = 0) -> list[bytes]:
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        small = rng.integers(0, 255, (h // 16 + 1, w // 16 + 1, 3), dtype=np.uint8)
        image = Image.fromarray(small).resize((w, h), Image.BILINEAR)
        buf = io.BytesIO()
        image.save(buf, format="JPEG", quality=90)
        out.append(buf.getvalue())
    return out


def match_share(reference, ours, iou: float = 0.99) -> tuple[int, int, float]:
    """(matched, reference boxes, max box diff px): greedy same-class IoU >= iou, as export/parity.compare."""
    import torch
    from torchvision.ops import box_iou

    matched = total = 0
    worst = 0.0
    for a, b in zip(reference, ours):
        total += len(a)
        if not len(a) or not len(b):
            continue
        ious = box_iou(torch.from_numpy(a.boxes).double(), torch.from_numpy(b.boxes).double())
        ious[torch.from_numpy(a.class_ids)[:, None] != torch.from_numpy(b.class_ids)[None]] = 0
        used_a, used_b = set(), set()
        for flat in torch.argsort(-ious.flatten()).tolist():
            i, j = divmod(flat, ious.shape[1])
            if ious[i, j] < iou:
                break
            if i in used_a or j in used_b:
                continue
            used_a.add(i), used_b.add(j)
            matched += 1
            worst = max(worst, float(abs(a.boxes[i] - b.boxes[j]).max()))
    return matched, total, worst


# -- the check ---------------------------------------------------------------------


def run(model_dir: Path, out_dir: Path, *, smoke: bool) -> dict:
    import numpy as np
    import torch

    from detserve.runtime import images as imagelib
    from detserve.runtime.device import CudaGraphs, DeviceBatch, DevicePath, head_output
    from detserve.runtime.gpu_decode import decode_batch
    from detserve.runtime.postprocess import DetectParams, unletterbox, yolo_nms
    from detserve.runtime.preprocess import letterbox, pack

    started = time.perf_counter()
    left = lambda: BUDGET_S - (time.perf_counter() - started)  # noqa: E731
    device = torch.device("cpu" if smoke else "cuda:0")
    manifest = json.loads((model_dir / "manifest.json").read_text())
    if not manifest.get("program"):
        raise SystemExit(f"{model_dir} has no model.pt2: export it with `detserve export --model yolo --pod gpu-a100 --out {model_dir}`")
    imgsz = int(manifest["input"]["imgsz"])
    batches = (1, 2) if smoke else (1, 8, 32, 128)
    iters = 2 if smoke else 20
    program_path = model_dir / manifest["program"]["file"]
    fp32_cpu = torch.export.load(str(program_path)).module()
    report: dict = {
        "when": time.strftime("%Y-%m-%d %H:%M:%S"), "device": torch.cuda.get_device_name(0) if device.type == "cuda" else "cpu (smoke)",
        "torch": torch.__version__, "python": platform.python_version(), "model": manifest["name"], "imgsz": imgsz,
        "engine_only": [], "end_to_end": [], "parity": {}, "fasterrcnn": [], "skipped": [],
    }  # fmt: skip
    dtype = torch.float32 if smoke else torch.float16
    model = torch.export.load(str(program_path)).module().to(device=device, dtype=dtype)
    if device.type == "cuda":
        model = model.to(memory_format=torch.channels_last)

    # 1. engine only: eager, CUDA graphs, compiled
    compiled = None
    if smoke:  # Inductor's CPU autotuning takes minutes on a busy CI machine: the smoke run checks the rest
        report["skipped"].append("torch.compile: CPU smoke run")
    else:
        try:
            compiled = torch.compile(model, mode="max-autotune-no-cudagraphs", dynamic=False)
        except Exception as exc:  # recorded, not fatal
            report["skipped"].append(f"torch.compile: {type(exc).__name__}: {exc}")
    for b in batches:
        row = {"batch": b}
        batch = DeviceBatch(imgsz, b, device, dtype)
        if device.type == "cuda":
            batch.buffer = batch.buffer.contiguous(memory_format=torch.channels_last)
            torch.cuda.reset_peak_memory_stats(device)
        x = batch.buffer[:b]
        with torch.inference_mode():
            row["eager_ips"] = b / timed(lambda: model(x), device, iters)
            if device.type == "cuda":
                row["peak_mem_mb"] = torch.cuda.max_memory_allocated(device) / 2**20
                graphs = CudaGraphs(lambda t: head_output(model(t)), batch)
                row["graphs_ips"] = b / timed(lambda: graphs(x), device, iters)
            else:
                report["skipped"].append("CUDA graphs: CPU smoke run") if b == batches[0] else None
            if compiled is not None and left() > 120:
                try:
                    row["compiled_ips"] = b / timed(lambda: compiled(x), device, iters)
                except Exception as exc:
                    report["skipped"].append(f"compiled at batch {b}: {type(exc).__name__}: {str(exc)[:200]}")
                    compiled = None
        report["engine_only"].append(row)

    # 2. parity: device path vs the CPU reference on the same images
    params = DetectParams(conf=float(manifest.get("defaults", {}).get("conf", 0.25)))
    sets = {"640x480": make_jpegs(8 if smoke else 512, 640, 480, 1), "810x1080": make_jpegs(4 if smoke else 256, 810, 1080, 2)}
    for photo in ("bus.jpg", "zidane.jpg"):
        if (model_dir / photo).is_file():
            sets.setdefault("photos", []).append((model_dir / photo).read_bytes())
    check_images = [imagelib.decode(b) for b in (sets.get("photos", []) + sets["640x480"][:6])]
    reference = []
    for image in check_images:
        boxed, geometry = letterbox(image, imgsz, rect=False)
        with torch.inference_mode():
            raw = fp32_cpu(torch.from_numpy(pack([boxed], 1 / 255))).numpy()
        reference.append(unletterbox(yolo_nms(raw, params)[0], geometry))
    for name, (dt, graphs_on) in {"fp32": (torch.float32, False), "fp16+graphs": (dtype, device.type == "cuda")}.items():
        m = model if dt == dtype else torch.export.load(str(program_path)).module().to(device=device)
        path = DevicePath(m, imgsz=imgsz, max_batch=8, device=device, dtype=dt, cuda_graphs=graphs_on, channels_last=device.type == "cuda" and dt == dtype)
        ours = path.detect([torch.from_numpy(np.array(im)) for im in check_images], params)
        matched, total, worst = match_share(reference, ours)
        report["parity"][name] = {"images": len(check_images), "reference_boxes": total, "matched": matched, "max_box_diff_px": worst}

    # 3. end to end: JPEG bytes -> boxes, CPU decode (16 threads) vs GPU decode
    e2e_batch = 2 if smoke else 128
    path = DevicePath(model, imgsz=imgsz, max_batch=e2e_batch, device=device, dtype=dtype, cuda_graphs=device.type == "cuda", channels_last=device.type == "cuda")
    pool = ThreadPoolExecutor(16)

    def cpu_decode(blobs):
        return [torch.from_numpy(a).pin_memory() if device.type == "cuda" else torch.from_numpy(a) for a in pool.map(imagelib.decode, blobs)]

    for set_name, blobs in sets.items():
        if set_name == "photos":
            continue
        for decoder in ("cpu-16-threads", "gpu-nvjpeg"):
            if left() < 30:
                report["skipped"].append(f"end to end {set_name} {decoder}: out of time")
                continue
            decode = cpu_decode if decoder.startswith("cpu") else (lambda bl: decode_batch(bl, device=device)[0])

            def once():
                for i in range(0, len(blobs), e2e_batch):
                    path.detect(decode(blobs[i : i + e2e_batch]), params)

            seconds = timed(once, device, 1 if smoke else 3)
            report["end_to_end"].append({"set": set_name, "decode": decoder, "batch": e2e_batch, "images": len(blobs), "ips": len(blobs) / seconds})
    pool.shutdown()

    # 4. Faster R-CNN batch scaling (random init: throughput only)
    if left() > 60:
        import torchvision

        rcnn = torchvision.models.detection.fasterrcnn_mobilenet_v3_large_fpn(weights=None, weights_backbone=None, num_classes=5).eval().to(device)
        for b in ((1, 2) if smoke else (1, 4, 16)):
            xs = [torch.rand(3, 480, 640, device=device) for _ in range(b)]
            with torch.inference_mode(), torch.autocast(device.type, enabled=device.type == "cuda"):
                report["fasterrcnn"].append({"batch": b, "ips": b / timed(lambda: rcnn(xs), device, 1 if smoke else 5)})
    else:
        report["skipped"].append("Faster R-CNN: out of time")
    report["seconds"] = round(time.perf_counter() - started, 1)
    return report


def markdown(report: dict) -> str:
    lines = [f"# GPU check, {report['when']}, {report['device']}, torch {report['torch']}, {report['model']} at {report['imgsz']}", ""]
    lines += ["| batch | eager fp16 img/s | CUDA graphs img/s | compiled img/s | peak MB |", "|---|---|---|---|---|"]
    for r in report["engine_only"]:
        lines.append(f"| {r['batch']} | {r.get('eager_ips', 0):.0f} | {r.get('graphs_ips', 0):.0f} | {r.get('compiled_ips', 0):.0f} | {r.get('peak_mem_mb', 0):.0f} |")
    lines += ["", "| set | decode | batch | img/s (JPEG in, boxes out) |", "|---|---|---|---|"]
    lines += [f"| {r['set']} | {r['decode']} | {r['batch']} | {r['ips']:.0f} |" for r in report["end_to_end"]]
    lines += ["", "parity (device path vs CPU reference): " + json.dumps(report["parity"])]
    lines += ["", "Faster R-CNN: " + ", ".join(f"batch {r['batch']}: {r['ips']:.1f} img/s" for r in report["fasterrcnn"])]
    if report["skipped"]:
        lines += ["", "not run: " + "; ".join(report["skipped"])]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", type=Path, default=CHECKOUT / "artifacts" / "gpu-check" / "yolo", help="export folder with model.pt2")
    parser.add_argument("--out", type=Path, default=CHECKOUT / "gpu-check")
    parser.add_argument("--cpu-smoke", action="store_true", help="run every section on the CPU at toy sizes")
    args = parser.parse_args(argv)
    _map_namespace()
    if not args.cpu_smoke and (why := no_cuda_message()):
        print(f"gpu_check: {why}. Run it on a machine with a CUDA GPU (or pass --cpu-smoke to check the script).")
        return 0
    report = run(args.model, args.out, smoke=args.cpu_smoke)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "gpu_check.json").write_text(json.dumps(report, indent=2) + "\n")
    (args.out / "gpu_check.md").write_text(markdown(report))
    print(markdown(report))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
