"""``detserve``: export, predict, evaluate, serve, bench. One command line for the whole product.

Every user error ends in one red line and exit code 2, never a traceback
(``DETSERVE_DEBUG=1`` shows the traceback for bug reports).
"""

from __future__ import annotations

import functools
import os
import sys
from pathlib import Path
from typing import Optional

import typer

from detserve.runtime import offline

offline.apply()

app = typer.Typer(
    name="detserve",
    help="Batched inference server for object-detection models (YOLO, Faster R-CNN).",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    # Plain help: typer's rich panels type every flag as "<bool>" (--force <bool>), which
    # reads as if the flag took a value; click's own layout shows flags bare.
    rich_markup_mode=None,
)


def _print_version(value: bool) -> None:
    # A callback, not a check in _root: _root only runs once a subcommand is found, so
    # `detserve --version` alone would end in "Missing command".
    if value:
        from detserve import __version__

        typer.echo(f"detserve {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: bool = typer.Option(False, "--version", help="Print the version and exit.", is_eager=True, callback=_print_version),
) -> None:
    """Batched inference server for object-detection models (YOLO, Faster R-CNN)."""


def _fail(message: str, code: int = 2) -> None:
    from detserve.runtime.progress import console

    console.print(f"[bold red]error:[/] {message}", soft_wrap=True)  # one line, however long
    raise typer.Exit(code)


def user_errors(func):
    """Turn the errors a user can cause into one line and exit code 2."""

    @functools.wraps(func)
    def wrapper(*args, **kwargs):
        from detserve.runtime.images import ImageError
        from detserve.runtime.manifest import ManifestError
        from detserve.runtime.sources import SourceError

        known: tuple[type[Exception], ...] = (ImageError, ManifestError, SourceError, FileNotFoundError, ValueError)
        try:
            return func(*args, **kwargs)
        except typer.Exit:
            raise
        except KeyboardInterrupt:
            _fail("interrupted", 130)
        except known as exc:
            if os.environ.get("DETSERVE_DEBUG"):
                raise
            _fail(str(exc))

    return wrapper


@app.command()
@user_errors
def export(
    model: Optional[str] = typer.Option(None, "--model", help="Model family: yolo or fasterrcnn. With --adapter: the model of its dataloop.json (default: its only one)."),
    out: Optional[Path] = typer.Option(None, "--out", help="Folder to write the artifact and manifest.json into (with --adapter: default <DIR>/detserve-export/<model>)."),
    adapter: Optional[Path] = typer.Option(None, "--adapter", metavar="DIR", help="Export the weights a Dataloop adapter folder loads, and check the export against the adapter's own predict."),
    weights: Optional[Path] = typer.Option(None, "--weights", help="YOLO: .pt checkpoint or .yaml config. Faster R-CNN: state_dict (.pth); omit for random init."),
    arch: Optional[str] = typer.Option(None, "--arch", help="Faster R-CNN architecture, e.g. fasterrcnn_mobilenet_v3_large_320_fpn."),
    labels: Optional[Path] = typer.Option(None, "--labels", help="Class names, one per line (or JSON list/map); no background."),
    imgsz: Optional[int] = typer.Option(None, "--imgsz", help="YOLO: square input size. Faster R-CNN: the transform's min_size."),
    format: str = typer.Option("onnx", "--format", help="onnx, tensorrt, or aoti (the compiled PyTorch engine, built inside a GPU pod)."),
    pod: str = typer.Option("regular", "--pod", help="Target Dataloop pod: regular, gpu-t4, gpu-v100, gpu-a100."),
    precision: Optional[str] = typer.Option(None, "--precision", help="fp32 or fp16 (default: the pod's); int8: also calibrated int8 variants behind an accuracy gate (docs/precision.md)."),
    max_batch: Optional[int] = typer.Option(None, "--max-batch", help="Largest batch per engine call (default: the pod's)."),
    opset: int = typer.Option(17, "--opset", help="ONNX opset."),
    parity_threshold: float = typer.Option(0.99, "--parity-threshold", help="Share of source boxes the artifact must match (IoU >= 0.99, same class)."),
    force: bool = typer.Option(False, "--force", help="Replace an existing export folder."),
    calibration: Optional[Path] = typer.Option(None, "--calibration", help="int8: a folder of images like those you will serve, to calibrate on (default: a photo and generated scenes, with a warning)."),
    val: Optional[Path] = typer.Option(None, "--val", help="int8: labelled images (YOLO txt labels, or a COCO json) to gate on: mAP50-95 of fp32 and int8."),
    max_map_drop: float = typer.Option(0.005, "--max-map-drop", help="int8 with --val: the export fails when mAP50-95 drops by more than this."),
    min_agreement: float = typer.Option(0.9, "--min-agreement", help="int8 without --val: the least share of the fp32 boxes int8 must find (same class, IoU >= 0.9)."),
) -> None:
    """Export weights to ONNX / TensorRT, check parity with the source model, write manifest.json."""
    from detserve.export.pipeline import ExportError, ExportRequest, export_model, read_labels

    if adapter is not None:
        _export_adapter(adapter, model, weights, out, imgsz, force, parity_threshold)
        return
    if out is None:
        _fail("--out is required: the folder to write the artifact and manifest.json into")
    if model not in ("yolo", "fasterrcnn"):
        _fail(f"--model must be yolo or fasterrcnn, got {model!r}")
    try:
        manifest = export_model(
            ExportRequest(
                model=model,  # type: ignore[arg-type]
                weights=weights,
                out=out,
                arch=arch,
                labels=read_labels(labels) if labels else None,
                imgsz=imgsz,
                format=format,  # type: ignore[arg-type]
                pod=pod,
                precision=precision,  # type: ignore[arg-type]
                max_batch=max_batch,
                opset=opset,
                parity_threshold=parity_threshold,
                force=force,
                calibration=calibration,
                val=val,
                max_map_drop=max_map_drop,
                min_found_share=min_agreement,
            )
        )
    except ExportError as exc:
        _fail(str(exc))
    from detserve.runtime.progress import console

    console.print(f"[green]exported[/] {manifest.name} -> {out / manifest.artifact} (manifest: {out / 'manifest.json'})")


def _export_adapter(folder: Path, model: Optional[str], weights: Optional[Path], out: Optional[Path], imgsz: Optional[int], force: bool, threshold: float) -> None:
    """``export --adapter``: the adapter's weights exported, then checked box by box against the adapter as written."""
    from detserve.adapters.accelerate import PARITY_FILE, accelerate
    from detserve.adapters.user_adapter import AdapterError
    from detserve.export.pipeline import ExportError
    from detserve.runtime.progress import console

    try:
        export, parity = accelerate(folder, model, weights=weights, out=out, imgsz=imgsz, force=force, threshold=threshold)
    except (AdapterError, ExportError) as exc:
        _fail(str(exc))
    used = parity.thresholds
    console.print(f"[green]exported[/] {folder} -> {export}, serving with conf {used['conf']:g}, iou {used['iou']:g}, max_det {used['max_det']} "
                  f"({', '.join(f'{k}: {v}' for k, v in used['from'].items())})", soft_wrap=True)  # fmt: skip
    console.print(parity.summary(), soft_wrap=True)
    for d in parity.differences:
        console.print(f"  image {d.image}: {d.side} box {d.label} {d.box} score {d.score:.3f}: {d.reason}", soft_wrap=True, markup=False)
    if parity.unlisted:
        console.print(f"  ... and {parity.unlisted} more (all in {export / PARITY_FILE})")
    if not parity.passed:
        _fail(f"the export gives the adapter's boxes for {parity.matched_share:.1%} of them, below --parity-threshold {threshold:.2f} "
              f"(figures in {export / PARITY_FILE}); `detserve serve --adapter {folder} --accelerated` will refuse it: serve the adapter as written", 1)  # fmt: skip
    console.print(f"serve it with: detserve serve --adapter {folder} --accelerated")


@app.command()
@user_errors
def models(
    only: Optional[str] = typer.Option(None, "--only", help="yolo or fasterrcnn (default: both)."),
    int8: bool = typer.Option(False, "--int8", help="Also the gated int8 variants, for `precision: auto|int8` (docs/precision.md)."),
) -> None:
    """Export the default models (trained on generated shapes, shipped in models/) into artifacts/."""
    from detserve.export.defaults import ensure_default_models
    from detserve.runtime.progress import console

    names = (only,) if only else ("yolo", "fasterrcnn")
    for name, folder in ensure_default_models(names, int8=int8).items():
        console.print(f"[green]ready[/] {name}: {folder}")


@app.command()
@user_errors
def predict(
    images: list[Path] = typer.Argument(..., help="Image files (JPEG, PNG, ...).", metavar="IMAGE"),
    model: Optional[Path] = typer.Option(None, "--model", help="Export folder (manifest + artifact); default: the default YOLO model."),
    out: Path = typer.Option(Path("predictions"), "--out", help="Folder for <stem>.json (Dataloop annotations) and <stem>.png."),
    conf: Optional[float] = typer.Option(None, "--conf", help="Score threshold (default: the model's)."),
    iou: Optional[float] = typer.Option(None, "--iou", help="NMS IoU threshold."),
    max_det: Optional[int] = typer.Option(None, "--max-det", help="Detections per image."),
    device: str = typer.Option("auto", "--device", help="auto, cpu, cuda or cuda:N."),
    backend: str = typer.Option("auto", "--backend", help="auto, onnxruntime, tensorrt or torch."),
) -> None:
    """Detect objects in images; write Dataloop annotation JSON and a picture with the boxes drawn."""
    import json

    from detserve.adapters import adapter_for
    from detserve.adapters.box_json import box_annotations
    from detserve.export.defaults import ensure_default_models
    from detserve.runtime.draw import draw_boxes
    from detserve.runtime.images import ImageError, decode
    from detserve.runtime.progress import console, track

    folder = model if model is not None else ensure_default_models(("yolo",))["yolo"]
    adapter = adapter_for(folder, device=device, backend=backend)
    params = adapter.detector.params(conf=conf, iou=iou, max_det=max_det)
    out.mkdir(parents=True, exist_ok=True)
    total, failed, empty = 0, [], []
    for path in track(images, "Predicting"):
        try:
            image = decode(path)
        except ImageError as exc:  # one unreadable file must not stop the others
            failed.append(f"{path}: {exc}")
            continue
        [det] = adapter.detector.detect([image], params)
        annotations = box_annotations(det, adapter.labels, adapter.detector.manifest.name, None)
        (out / f"{path.stem}.json").write_text(json.dumps(annotations, indent=1))
        draw_boxes(image, det, adapter.labels).save(out / f"{path.stem}.png")
        total += len(det)
        if not len(det):
            empty.append(path.name)
    done = len(images) - len(failed)
    labels = label_names(adapter.labels)
    console.print(f"[green]{total} boxes[/] in {done} image(s) with {adapter.detector.describe()['backend']}; wrote {out}/")
    if empty:
        console.print(f"[yellow]nothing found[/] in {', '.join(empty)} at conf >= {params.conf:g}. {_knows(adapter.detector.manifest.name, labels, folder)}")
    for line in failed:
        console.print(f"[bold red]error:[/] {line}")
    if failed:
        raise typer.Exit(1)


def label_names(labels: dict[int, str]) -> str:
    """The class names in id order, as one line: "circle, square, triangle, star"."""
    return ", ".join(labels[k] for k in sorted(labels))


def _knows(name: str, labels: str, folder: Path) -> str:
    from detserve.runtime.defaults import DEFAULT_MODELS

    line = f"Model {name} looks only for: {labels}."
    if any(Path(folder).resolve() == d.folder.resolve() for d in DEFAULT_MODELS.values()):
        line += (" The default models are trained on generated shapes only (models/README.md);"
                 " export your own weights with `detserve export` and pass --model.")  # fmt: skip
    return line


@app.command()
@user_errors
def info(
    model: str = typer.Option("yolo", "--model", help="Export folder, or a default model name (yolo, fasterrcnn)."),
) -> None:
    """What a model is and which classes it detects (from its manifest.json)."""
    from detserve.runtime.defaults import DEFAULT_MODELS
    from detserve.runtime.manifest import read_manifest

    if model in DEFAULT_MODELS and not Path(model).is_dir():
        from detserve.export.defaults import ensure_default_models

        folder = ensure_default_models((model,))[model]
    else:
        folder = Path(model)
    m = read_manifest(folder)
    size = m.input.imgsz or m.input.min_size
    typer.echo(f"model:   {m.name} ({m.family}, {m.arch})")
    typer.echo(f"folder:  {folder}")
    typer.echo(f"artifact: {m.artifact} ({m.format}, {m.precision}, pod {m.pod}), input {size} px, batch {m.batch.min}..{m.batch.max}")
    typer.echo(f"classes ({len(m.labels)}): {label_names(m.labels)}")
    typer.echo(f"defaults: {', '.join(f'{k}={v:g}' for k, v in m.defaults.items())}")
    for v in m.variants:
        gate = "no gate" if v.gate is None else f"gate {'passed' if v.gate.passed else 'FAILED'}: {v.gate.reason}"
        typer.echo(f"variant: {v.name} ({v.artifact}, {v.precision}, for {v.target}); {gate}")


@app.command()
@user_errors
def status(
    url: str = typer.Option("http://127.0.0.1:8000", "--url", help="The server's base URL."),
) -> None:
    """The running server's applications, their models, classes and batches (Ray's `serve status` needs the dashboard)."""
    from detserve.serve.client import ServerUnreachable, server_status

    try:
        apps = server_status(url)
    except ServerUnreachable as exc:
        _fail(str(exc), 1)
    if not apps:
        typer.echo(f"{url}: Serve answers but runs no application yet (still starting?)")
        raise typer.Exit(1)
    unhealthy = 0
    for app_status in apps:
        if app_status.error:
            unhealthy += 1
            typer.echo(f"{app_status.route:<14} {app_status.name}: NOT READY ({app_status.error})")
            continue
        i, s = app_status.info, app_status.stats
        typer.echo(f"{app_status.route:<14} {app_status.name}: ok  model {i['name']} on {i['backend']}/{i['device']}, "
                   f"classes: {label_names({int(k): v for k, v in i['labels'].items()})}")  # fmt: skip
        typer.echo(f"{'':<14} {s['images']} images in {s['batches']} batches (mean batch {s['mean_batch_size']:.1f}, one replica's count)")
    if unhealthy:
        raise typer.Exit(1)


@app.command()
@user_errors
def evaluate(
    data: Path = typer.Argument(..., help="A folder in Dataloop's layout (<subset>/items + <subset>/json, as prepare_data downloads it), or one subset's folder."),
    model: Optional[Path] = typer.Option(None, "--model", help="Export folder (manifest + artifact); default: the default YOLO model."),
    subset: Optional[str] = typer.Option(None, "--subset", help="Subset to score (default: validation, or the only one)."),
    out: Path = typer.Option(Path("metrics.json"), "--out", help="Where to write the metrics as JSON."),
    conf: Optional[float] = typer.Option(None, "--conf", help="Score threshold of the boxes scored, and of precision/recall (default: the model's)."),
    device: str = typer.Option("auto", "--device", help="auto, cpu, cuda or cuda:N."),
    backend: str = typer.Option("auto", "--backend", help="auto, onnxruntime, tensorrt or torch."),
) -> None:
    """COCO mAP50, mAP50-95, per-label AP and precision/recall of a model on labelled data: check it before publishing."""
    import json

    from rich.table import Table

    from detserve.adapters import adapter_for
    from detserve.adapters.dtlpy_data import read_subset
    from detserve.export.defaults import ensure_default_models
    from detserve.runtime.images import decode
    from detserve.runtime.progress import console, track
    from detserve.training.metrics import ImageBoxes

    data_path, name = _dataloop_subset(data, subset)
    samples = read_subset(data_path, name, min_side=0.0)
    if not samples:
        raise ValueError(f"no images under {data_path / name / 'items'}")
    folder = model if model is not None else ensure_default_models(("yolo",))["yolo"]
    adapter = adapter_for(folder, device=device, backend=backend, **({"conf_thres": conf} if conf is not None else {}))
    params = adapter.detector.params(conf=conf)
    truth, predicted = [], []
    for sample in track(samples, f"Evaluating {name}"):
        image = decode(sample.image_path)
        [det] = adapter.detector.detect([image], params)
        truth.append(ImageBoxes(sample.boxes, sample.labels, None, image.shape[1], image.shape[0]))
        predicted.append(ImageBoxes(det.boxes, [adapter.labels.get(int(c), str(c)) for c in det.class_ids], det.scores))
    metrics = adapter.score(truth, predicted)

    table = Table(title=f"{adapter.detector.manifest.name} on {data_path / name} ({metrics.images} images, {metrics.objects} objects)")
    table.add_column("metric")
    table.add_column("value", justify="right")
    for key in ("mAP50-95", "mAP50", "mAP75"):
        table.add_row(key, f"{metrics.stats[key]:.4f}")
    table.add_row(f"precision @ conf {metrics.conf_thres:g}", f"{metrics.precision:.4f}")
    table.add_row(f"recall @ conf {metrics.conf_thres:g}", f"{metrics.recall:.4f}")
    for label, ap in metrics.per_label_ap.items():
        table.add_row(f"AP50-95 {label}", "no ground truth" if ap is None else f"{ap:.4f}")
    console.print(table)
    report = {"model": str(folder), "data": str(data_path), "subset": name, **metrics.to_json()}
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    console.print(f"[green]wrote[/] {out}")


def _dataloop_subset(data: Path, subset: Optional[str]) -> tuple[Path, str]:
    """(data_path, subset name) for a Dataloop-layout folder or one subset's folder."""
    if not data.is_dir():
        raise FileNotFoundError(f"{data} is not a folder; give the folder dtlpy's prepare_data wrote (<subset>/items + <subset>/json)")
    if (data / "items").is_dir():
        return data.parent, data.name
    found = sorted(p.name for p in data.iterdir() if (p / "items").is_dir())
    if subset is None:
        subset = "validation" if "validation" in found else found[0] if len(found) == 1 else None
        if subset is None:
            raise ValueError(f"{data} has subsets {found or 'none'}; choose one with --subset" if found
                             else f"{data} has no <subset>/items folder (Dataloop's layout: <subset>/items + <subset>/json)")  # fmt: skip
    if subset not in found:
        raise ValueError(f"{data} has no subset {subset!r} (found: {', '.join(found) or 'none'})")
    return data, subset


@app.command()
@user_errors
def serve(
    config: Optional[Path] = typer.Option(None, "--config", help="Serve config file (default: the deploy.yaml detserve ships)."),
    host: str = typer.Option("127.0.0.1", "--host", help="Bind address (loopback by default)."),
    port: int = typer.Option(8000, "--port", help="HTTP port."),
    app_name: Optional[list[str]] = typer.Option(None, "--app", metavar="NAME", help="Serve only this application; repeat for more (default: all)."),
    adapter: Optional[Path] = typer.Option(None, "--adapter", metavar="DIR", help="Serve a Dataloop adapter folder (dataloop.json, its module, the model's artifacts) instead of the config."),
    adapter_model: Optional[list[str]] = typer.Option(None, "--model", metavar="NAME", help="With --adapter: serve this model of dataloop.json; repeat for more (default: each, one app per model at /<name>)."),
    accelerated: bool = typer.Option(False, "--accelerated", help="With --adapter: serve the export `detserve export --adapter` made of the adapter's weights."),
) -> None:
    """Serve the applications of deploy.yaml (or a Dataloop adapter folder) on an embedded local Ray until Ctrl-C."""
    from detserve.export.defaults import ensure_default_models
    from detserve.runtime.defaults import DEFAULT_MODELS
    from detserve.runtime.paths import deploy_config
    from detserve.serve.run import AdapterServing, DeployFailed, load_config, main as run_server, require_auth_for

    require_auth_for(host)  # before exporting models or starting Ray
    config = config or deploy_config()
    if adapter is None and (adapter_model or accelerated):
        _fail("--model and --accelerated go with --adapter DIR")
    serving = None
    if adapter is not None:
        serving = AdapterServing(adapter.resolve(), tuple(adapter_model or ()), accelerated)
    else:
        names = [a.args.get("model") for a in load_config(config).applications
                 if (not app_name or a.name in app_name) and a.import_path == "detserve.serve.app:build_app"]  # fmt: skip
        defaults = tuple(n for n in names if n in DEFAULT_MODELS)
        if defaults:  # export once here, not in every replica
            ensure_default_models(defaults)
    try:
        run_server(config, host, port, app_name, adapter=serving)
    except DeployFailed as exc:
        _fail(str(exc))


@app.command(context_settings={"allow_extra_args": True, "ignore_unknown_options": True}, add_help_option=False)
def bench(ctx: typer.Context) -> None:
    """Benchmarks: raw engine, baseline, detserve, peers, side by side (see --help)."""
    from detserve.benchmarks.run import main as run_bench

    # The benchmark runner owns its options (argparse); --help prints them.
    raise typer.Exit(run_bench(list(ctx.args), prog="detserve bench"))


def main() -> None:  # pragma: no cover - console entry
    app()


if __name__ == "__main__":  # pragma: no cover
    sys.exit(app())
