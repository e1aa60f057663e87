"""Reproducible training recipes for the project's default models, and a mAP check.

    python -m detserve.training yolo --out models/yolo-shapes.pt
    python -m detserve.training fasterrcnn --out models/fasterrcnn-shapes.pth
    python -m detserve.training evaluate models/yolo-shapes.pt

Both recipes train from scratch on ``detserve.training.synthetic`` scenes, offline, on
CPU; the defaults reproduce the files in ``models/`` (see models/README.md).
This module depends on no other detserve module except ``offline`` and
``synthetic``, so it can check any engine: ``evaluate_map`` takes a plain
``predict_fn``.
"""

from __future__ import annotations

import math
import shutil
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np

from detserve.runtime import offline
from detserve.training import synthetic
from detserve.training.synthetic import CLASSES, Scene

#: ``predict_fn(list of HxWx3 uint8 RGB arrays) -> [(boxes xyxy (N,4), scores (N,), class index (N,)), ...]``
PredictFn = Callable[[list[np.ndarray]], list[tuple[np.ndarray, np.ndarray, np.ndarray]]]

#: The held-out set that models/README.md reports: ``synthetic.scenes(EVAL_N, EVAL_SEED)``.
EVAL_SEED, EVAL_N = 2026, 200

#: Ultralytics arguments of the shipped YOLO recipe beyond those ``train_yolo`` names.
YOLO_TRAIN_ARGS: dict = {
    "batch": 8,
    "nbs": 8,  # one optimizer step per batch (the default 64 accumulates 8 batches)
    "optimizer": "AdamW",
    "lr0": 0.002,
    "cos_lr": True,
    "warmup_epochs": 1,
    "close_mosaic": 2,
}


# --- Ultralytics YOLO ------------------------------------------------------------


def train_yolo(
    out: Path,
    *,
    cfg: str = "yolov8n.yaml",
    imgsz: int = 320,
    epochs: int = 9,
    n_train: int = 480,
    n_val: int = 60,
    seed: int = 0,
    workdir: Path | None = None,
    threads: int = 2,
    **train_args,
) -> Path:
    """Train ``cfg`` from scratch on generated scenes and copy ``best.pt`` to ``out``.

    ``train_args`` override :data:`YOLO_TRAIN_ARGS` (any ``YOLO.train`` argument).
    """
    offline.apply()
    import torch

    torch.set_num_threads(threads)
    import ultralytics.utils.torch_utils as ultralytics_torch_utils
    from ultralytics import YOLO

    # Ultralytics resets CPU training to os.cpu_count() - 1 threads (1 on a 2-core machine).
    ultralytics_torch_utils.NUM_THREADS = threads

    out = Path(out)
    cleanup = workdir is None
    workdir = Path(tempfile.mkdtemp(prefix="detserve-yolo-")) if workdir is None else Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    try:
        data = synthetic.write_yolo_dataset(workdir / "data", n_train=n_train, n_val=n_val, seed=seed)
        model = YOLO(cfg)
        started = time.perf_counter()
        with _EpochProgress("yolo", epochs) as progress:
            model.add_callback("on_fit_epoch_end", progress.yolo_epoch_end)
            model.train(
                **{
                    **YOLO_TRAIN_ARGS,
                    **train_args,
                    "data": str(data),
                    "imgsz": imgsz,
                    "epochs": epochs,
                    "workers": 0,
                    "amp": False,
                    "plots": False,
                    "device": "cpu",
                    "val": True,
                    "project": str(workdir / "runs"),
                    "name": "train",
                    "exist_ok": True,
                    "seed": seed,
                    "deterministic": True,
                }
            )
        elapsed = time.perf_counter() - started
        best = Path(model.trainer.best)
        names = YOLO(str(best)).names
        if [names[i] for i in sorted(names)] != list(CLASSES):
            raise RuntimeError(f"{best} has class names {names}, expected {CLASSES}")
        out.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(best, out)
        print(f"yolo: trained in {elapsed:.0f} s, wrote {out} ({out.stat().st_size / 1e6:.1f} MB)")
        return out
    finally:
        if cleanup:
            shutil.rmtree(workdir, ignore_errors=True)


def yolo_predict_fn(weights: Path, *, imgsz: int = 320, conf: float = 0.001, threads: int = 2) -> PredictFn:
    """A ``predict_fn`` for an Ultralytics checkpoint (RGB in; Ultralytics wants BGR)."""
    offline.apply()
    import torch
    from ultralytics import YOLO

    torch.set_num_threads(threads)
    model = YOLO(str(weights))

    def predict(images: list[np.ndarray]):
        results = model.predict(
            [np.ascontiguousarray(image[..., ::-1]) for image in images],
            imgsz=imgsz,
            conf=conf,
            device="cpu",
            verbose=False,
        )
        return [
            (r.boxes.xyxy.numpy(), r.boxes.conf.numpy(), r.boxes.cls.numpy().astype(np.int64)) for r in results
        ]

    return predict


# --- torchvision Faster R-CNN ------------------------------------------------------


def build_fasterrcnn(arch: str, *, min_size: int, max_size: int, **kwargs):
    """An untrained torchvision detector with background + CLASSES outputs."""
    from detserve.runtime.sources import build_fasterrcnn as build

    return build(arch, len(CLASSES) + 1, min_size=min_size, max_size=max_size, **kwargs)


def train_fasterrcnn(
    out: Path,
    *,
    arch: str = "fasterrcnn_mobilenet_v3_large_320_fpn",
    epochs: int = 3,
    n_train: int = 1500,
    seed: int = 0,
    min_size: int = 288,
    max_size: int = 288,
    batch: int = 4,
    lr: float = 1e-3,
    time_budget_s: float | None = 540,
    snapshot_at_s: Sequence[float] = (),
    threads: int = 1,
) -> Path:
    """Train ``arch`` from scratch on generated scenes; save an fp16 checkpoint to ``out``.

    AdamW, a short warm-up, then a cosine decay; random horizontal/vertical
    flips. The schedule runs on whichever ends first, ``epochs`` or
    ``time_budget_s`` of training time, so a busy machine still gets a fully
    decayed model (and a different one: pass ``time_budget_s=None`` for a run
    that depends on the seed alone). ``snapshot_at_s`` also saves
    ``<out stem>-<t>s<suffix>`` copies when training time passes each value.

    ``threads`` defaults to 1: on this project's 2-core machines a second
    thread doubles speed when idle but made steps 2-4x slower when another
    process used a core.
    """
    offline.apply()
    import torch

    torch.set_num_threads(threads)
    torch.manual_seed(seed)
    out = Path(out)
    train_scenes = synthetic.scenes(n_train, seed)
    # Training-only settings (not in the checkpoint): fewer proposals and sampled
    # RoIs than the defaults (2000 and 512), as RoIAlign and the box head dominate CPU time.
    model = build_fasterrcnn(
        arch,
        min_size=min_size,
        max_size=max_size,
        box_batch_size_per_image=64,
        rpn_pre_nms_top_n_train=600,
        rpn_post_nms_top_n_train=600,
    )
    snapshots = sorted(snapshot_at_s)

    def snapshot(step: int, elapsed: float) -> None:
        while snapshots and elapsed >= snapshots[0]:
            t = snapshots.pop(0)
            save_fasterrcnn(model, out.with_name(f"{out.stem}-{int(t)}s{out.suffix}"), arch, min_size, max_size)
            print(f"fasterrcnn: snapshot at {elapsed:.0f} s, step {step}", flush=True)

    samples = [(s.image, s.boxes, s.classes + 1) for s in train_scenes]  # torchvision: 0 is background
    started = time.perf_counter()
    step = fit_fasterrcnn(model, samples, epochs=epochs, batch=batch, lr=lr, seed=seed, time_budget_s=time_budget_s, on_step=snapshot)
    elapsed = time.perf_counter() - started
    save_fasterrcnn(model, out, arch, min_size, max_size)
    print(
        f"fasterrcnn: trained {step} steps of {batch} images in {elapsed:.0f} s, "
        f"wrote {out} ({out.stat().st_size / 1e6:.1f} MB)"
    )
    return out


def fit_fasterrcnn(
    model,
    samples: Sequence[tuple[np.ndarray, np.ndarray, np.ndarray]],
    *,
    epochs: int,
    batch: int = 4,
    lr: float = 1e-3,
    seed: int = 0,
    time_budget_s: float | None = None,
    on_step: Callable[[int, float], None] | None = None,
) -> int:
    """The Faster R-CNN training loop, for the default model and for the Dataloop adapter.

    ``samples``: (HxWx3 uint8 RGB image, (K, 4) xyxy boxes, (K,) torchvision
    label ids, 0 being background). AdamW, a 5 % warm-up, then a cosine decay;
    random horizontal/vertical flips. The schedule runs on whichever ends
    first, ``epochs`` or ``time_budget_s`` of training time. Returns the steps
    taken; the model is left in eval mode.
    """
    import torch

    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=1e-4)
    total_steps = max(1, epochs * math.ceil(len(samples) / batch))

    def lr_at(progress: float) -> float:
        warmup = 0.05
        if progress < warmup:
            return lr * (0.01 + 0.99 * progress / warmup)
        return lr * (0.02 + 0.98 * 0.5 * (1 + math.cos(math.pi * min(1.0, (progress - warmup) / (1 - warmup)))))

    generator = torch.Generator().manual_seed(seed)
    flips = np.random.default_rng([seed, 1])
    started = time.perf_counter()
    step, progress = 0, 0.0
    with _EpochProgress("fasterrcnn", 1000, unit="‰") as bar:
        for epoch in range(epochs):
            order = torch.randperm(len(samples), generator=generator).tolist()
            for first in range(0, len(samples), batch):
                elapsed = time.perf_counter() - started
                progress = max(step / total_steps, elapsed / time_budget_s if time_budget_s else 0.0)
                if progress >= 1.0:
                    break
                for group in optimizer.param_groups:
                    group["lr"] = lr_at(progress)
                images, targets = zip(*(_frcnn_sample(*samples[i], flips) for i in order[first : first + batch]))
                losses = model(list(images), list(targets))
                loss = sum(losses.values())
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                torch.nn.utils.clip_grad_norm_(params, 10.0)
                optimizer.step()
                step += 1
                bar.set(int(1000 * progress), f"epoch {epoch + 1}/{epochs} step {step} loss {loss.item():.3f}")
                if on_step is not None:
                    on_step(step, time.perf_counter() - started)
            if progress >= 1.0:
                break
    model.eval()
    return step


def _frcnn_sample(image: np.ndarray, boxes: np.ndarray, labels: np.ndarray, rng: np.random.Generator):
    import torch

    boxes = np.asarray(boxes, np.float32).reshape(-1, 4).copy()
    h, w = image.shape[:2]
    if rng.random() < 0.5:
        image = image[:, ::-1]
        boxes[:, [0, 2]] = w - boxes[:, [2, 0]]
    if rng.random() < 0.5:
        image = image[::-1]
        boxes[:, [1, 3]] = h - boxes[:, [3, 1]]
    tensor = torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1).float().div_(255)
    target = {"boxes": torch.from_numpy(boxes), "labels": torch.from_numpy(np.asarray(labels, np.int64))}
    return tensor, target


def save_fasterrcnn(model, path: Path, arch: str, min_size: int, max_size: int) -> Path:
    """Save the checkpoint format that the project loads; floating tensors as fp16."""
    import torch

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().half() if v.is_floating_point() else v.detach() for k, v in model.state_dict().items()}
    torch.save(
        {
            "arch": arch,
            "num_classes": len(CLASSES) + 1,
            "labels": list(CLASSES),
            "min_size": min_size,
            "max_size": max_size,
            "state_dict": state,
        },
        path,
    )
    return path


def load_fasterrcnn(path: Path):
    """A checkpoint written by :func:`save_fasterrcnn`, as an fp32 model in eval mode."""
    from detserve.runtime.sources import build_fasterrcnn as build, read_fasterrcnn_checkpoint

    ckpt = read_fasterrcnn_checkpoint(Path(path), None)  # weights_only; fp16 tensors back to fp32
    return build(ckpt.arch, ckpt.num_classes, state_dict=ckpt.state_dict, min_size=ckpt.min_size, max_size=ckpt.max_size)


def fasterrcnn_predict_fn(checkpoint: Path, *, threads: int = 2) -> PredictFn:
    """A ``predict_fn`` for a checkpoint written by :func:`save_fasterrcnn`."""
    import torch

    torch.set_num_threads(threads)
    model = load_fasterrcnn(checkpoint)

    def predict(images: list[np.ndarray]):
        tensors = [torch.from_numpy(np.ascontiguousarray(i)).permute(2, 0, 1).float().div_(255) for i in images]
        with torch.inference_mode():
            outputs = model(tensors)
        return [(o["boxes"].numpy(), o["scores"].numpy(), o["labels"].numpy().astype(np.int64) - 1) for o in outputs]

    return predict


# --- evaluation -------------------------------------------------------------------


def evaluate_map(predict_fn: PredictFn, scenes: list[Scene], *, batch_size: int = 8) -> dict:
    """COCO mAP of ``predict_fn`` on ``scenes``: ``{"map50_95": ..., "map50": ...}`` (``training.metrics``)."""
    from detserve.training.metrics import ImageBoxes, coco_metrics

    truth = [_scene_boxes(scene) for scene in scenes]
    predicted = [
        ImageBoxes(np.asarray(boxes, np.float64).reshape(-1, 4), [CLASSES[int(c)] for c in np.asarray(classes)], np.asarray(scores, np.float64))
        for boxes, scores, classes in _predict_all(predict_fn, scenes, batch_size)
    ]
    result = coco_metrics(truth, predicted, CLASSES)
    return {"map50_95": result.map50_95, "map50": result.map50}


def _scene_boxes(scene: Scene):
    from detserve.training.metrics import ImageBoxes

    h, w = scene.image.shape[:2]
    return ImageBoxes(scene.boxes.astype(np.float64), [CLASSES[int(c)] for c in scene.classes], None, w, h)


def confident_match(
    predict_fn: PredictFn, scenes: list[Scene], *, score: float = 0.5, iou: float = 0.5, batch_size: int = 8
) -> dict:
    """Precision and recall of the boxes scoring above ``score`` (same class, IoU >= ``iou``)."""
    true_positive = n_predicted = n_truth = 0
    for scene, (boxes, scores, classes) in zip(scenes, _predict_all(predict_fn, scenes, batch_size)):
        keep = np.asarray(scores) > score
        boxes, classes = np.asarray(boxes, dtype=np.float32)[keep], np.asarray(classes)[keep]
        n_predicted += len(boxes)
        n_truth += len(scene.boxes)
        unmatched = set(range(len(scene.boxes)))
        for box, cls in zip(boxes, classes):
            best, best_iou = None, iou
            for j in unmatched:
                if scene.classes[j] == cls and (overlap := _iou(box, scene.boxes[j])) >= best_iou:
                    best, best_iou = j, overlap
            if best is not None:
                unmatched.discard(best)
                true_positive += 1
    return {
        "precision": true_positive / max(n_predicted, 1),
        "recall": true_positive / max(n_truth, 1),
        "boxes": n_predicted,
        "objects": n_truth,
    }


def _iou(a: np.ndarray, b: np.ndarray) -> float:
    w = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    h = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = w * h
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return float(inter / union) if union > 0 else 0.0


def _predict_all(predict_fn: PredictFn, scenes: list[Scene], batch_size: int):
    for first in range(0, len(scenes), batch_size):
        yield from predict_fn([scene.image for scene in scenes[first : first + batch_size]])


class _EpochProgress:
    """A rich progress bar that survives Ultralytics' own logging."""

    def __init__(self, name: str, total: int, unit: str = "epoch"):
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

        self._progress = Progress(
            TextColumn(f"[bold]{name}[/]"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn(unit + "s"),
            TimeElapsedColumn(),
            TextColumn("{task.description}"),
        )
        self._task = self._progress.add_task("", total=total)

    def __enter__(self):
        self._progress.start()
        return self

    def __exit__(self, *exc):
        self._progress.stop()

    def advance(self, description: str = "") -> None:
        self._progress.update(self._task, advance=1, description=description)

    def set(self, completed: int, description: str = "") -> None:
        self._progress.update(self._task, completed=completed, description=description)

    def yolo_epoch_end(self, trainer) -> None:
        map50 = (trainer.metrics or {}).get("metrics/mAP50(B)")
        if trainer.epoch < trainer.epochs:  # not the final validation of best.pt
            self.advance(f"val mAP50 {map50:.3f}" if map50 is not None else "")


# --- command line -----------------------------------------------------------------


def _cli():
    import typer

    app = typer.Typer(add_completion=False, no_args_is_help=True, help=__doc__.split("\n")[0])

    @app.command()
    def yolo(
        out: Path = typer.Option(Path("models/yolo-shapes.pt"), help="Where to write the checkpoint."),
        cfg: str = "yolov8n.yaml",
        imgsz: int = 320,
        epochs: int = 9,
        n_train: int = 480,
        seed: int = 0,
        workdir: Path | None = typer.Option(None, help="Keep the dataset and run here (default: a temp dir)."),
    ):
        """Train the default YOLO model."""
        train_yolo(out, cfg=cfg, imgsz=imgsz, epochs=epochs, n_train=n_train, seed=seed, workdir=workdir)

    @app.command()
    def fasterrcnn(
        out: Path = typer.Option(Path("models/fasterrcnn-shapes.pth"), help="Where to write the checkpoint."),
        arch: str = "fasterrcnn_mobilenet_v3_large_320_fpn",
        epochs: int = 3,
        n_train: int = 1500,
        seed: int = 0,
        min_size: int = 288,
        max_size: int = 288,
        time_budget_s: float = typer.Option(540, help="Training-time cap in seconds; 0 for none."),
        snapshot_at_s: list[float] = typer.Option([], help="Also save copies at these training times."),
    ):
        """Train the default Faster R-CNN model."""
        train_fasterrcnn(
            out,
            arch=arch,
            epochs=epochs,
            n_train=n_train,
            seed=seed,
            min_size=min_size,
            max_size=max_size,
            time_budget_s=time_budget_s or None,
            snapshot_at_s=snapshot_at_s,
        )

    @app.command()
    def evaluate(
        weights: Path,
        n: int = EVAL_N,
        seed: int = EVAL_SEED,
        imgsz: int = typer.Option(320, help="YOLO inference size."),
    ):
        """mAP and confident-box precision/recall on held-out generated scenes."""
        if weights.suffix == ".pt":
            predict = yolo_predict_fn(weights, imgsz=imgsz)
        else:
            predict = fasterrcnn_predict_fn(weights)
        held_out = synthetic.scenes(n, seed)
        started = time.perf_counter()
        result = evaluate_map(predict, held_out)
        result |= {f"conf>0.5 {k}": v for k, v in confident_match(predict, held_out).items()}
        result["seconds"] = round(time.perf_counter() - started, 1)
        print({k: round(v, 4) if isinstance(v, float) else v for k, v in result.items()})

    app()


if __name__ == "__main__":
    _cli()
