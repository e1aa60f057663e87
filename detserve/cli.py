"""``detserve``: export, predict, serve, bench. One command line for the whole product.

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
)


@app.callback()
def _root(
    version: bool = typer.Option(False, "--version", help="Print the version and exit.", is_eager=True),
) -> None:
    """Batched inference server for object-detection models (YOLO, Faster R-CNN)."""
    if version:
        from detserve import __version__

        typer.echo(f"detserve {__version__}")
        raise typer.Exit()


def _fail(message: str, code: int = 2) -> None:
    from detserve.runtime.progress import console

    console.print(f"[bold red]error:[/] {message}")
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
    model: str = typer.Option(..., "--model", help="Model family: yolo or fasterrcnn."),
    out: Path = typer.Option(..., "--out", help="Folder to write the artifact and manifest.json into."),
    weights: Optional[Path] = typer.Option(None, "--weights", help="YOLO: .pt checkpoint or .yaml config. Faster R-CNN: state_dict (.pth); omit for random init."),
    arch: Optional[str] = typer.Option(None, "--arch", help="Faster R-CNN architecture, e.g. fasterrcnn_mobilenet_v3_large_320_fpn."),
    labels: Optional[Path] = typer.Option(None, "--labels", help="Class names, one per line (or JSON list/map); no background."),
    imgsz: Optional[int] = typer.Option(None, "--imgsz", help="YOLO: square input size. Faster R-CNN: the transform's min_size."),
    format: str = typer.Option("onnx", "--format", help="onnx, tensorrt, or aoti (the compiled PyTorch engine, built inside a GPU pod)."),
    pod: str = typer.Option("regular", "--pod", help="Target Dataloop pod: regular, gpu-t4, gpu-v100, gpu-a100."),
    precision: Optional[str] = typer.Option(None, "--precision", help="fp32 or fp16 (default: the pod's)."),
    max_batch: Optional[int] = typer.Option(None, "--max-batch", help="Largest batch per engine call (default: the pod's)."),
    opset: int = typer.Option(17, "--opset", help="ONNX opset."),
    parity_threshold: float = typer.Option(0.99, "--parity-threshold", help="Share of source boxes the artifact must match (IoU >= 0.99, same class)."),
    force: bool = typer.Option(False, "--force", help="Replace an existing export folder."),
) -> None:
    """Export weights to ONNX / TensorRT, check parity with the source model, write manifest.json."""
    from detserve.export.pipeline import ExportError, ExportRequest, export_model, read_labels

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
            )
        )
    except ExportError as exc:
        _fail(str(exc))
    from detserve.runtime.progress import console

    console.print(f"[green]exported[/] {manifest.name} -> {out / manifest.artifact} (manifest: {out / 'manifest.json'})")


@app.command()
@user_errors
def models(
    only: Optional[str] = typer.Option(None, "--only", help="yolo or fasterrcnn (default: both)."),
) -> None:
    """Export the default models (trained on generated shapes, shipped in models/) into artifacts/."""
    from detserve.export.defaults import ensure_default_models
    from detserve.runtime.progress import console

    names = (only,) if only else ("yolo", "fasterrcnn")
    for name, folder in ensure_default_models(names).items():
        console.print(f"[green]ready[/] {name}: {folder}")


@app.command()
@user_errors
def predict(
    images: list[Path] = typer.Argument(..., help="Image files."),
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
    from detserve.adapters.base import to_collection
    from detserve.export.defaults import ensure_default_models
    from detserve.runtime.draw import draw_boxes
    from detserve.runtime.images import ImageError, decode
    from detserve.runtime.progress import console, track

    folder = model if model is not None else ensure_default_models(("yolo",))["yolo"]
    adapter = adapter_for(folder, device=device, backend=backend)
    params = adapter.detector.params(conf=conf, iou=iou, max_det=max_det)
    out.mkdir(parents=True, exist_ok=True)
    total, failed = 0, []
    for path in track(images, "Predicting"):
        try:
            image = decode(path)
        except ImageError as exc:  # one unreadable file must not stop the others
            failed.append(f"{path}: {exc}")
            continue
        [det] = adapter.detector.detect([image], params)
        collection = to_collection(det, adapter.labels, adapter.detector.manifest.name, None)
        (out / f"{path.stem}.json").write_text(json.dumps(collection.to_json()["annotations"], indent=1))
        draw_boxes(image, det, adapter.labels).save(out / f"{path.stem}.png")
        total += len(det)
    done = len(images) - len(failed)
    console.print(f"[green]{total} boxes[/] in {done} image(s) with {adapter.detector.describe()['backend']}; wrote {out}/")
    for line in failed:
        console.print(f"[bold red]error:[/] {line}")
    if failed:
        raise typer.Exit(1)


@app.command()
@user_errors
def serve(
    config: Path = typer.Option(Path(__file__).resolve().parent.parent / "deploy.yaml", "--config", help="Serve config file."),
    host: str = typer.Option("127.0.0.1", "--host", help="Bind address (loopback by default)."),
    port: int = typer.Option(8000, "--port"),
    app_name: Optional[list[str]] = typer.Option(None, "--app", help="Serve only these applications (default: all)."),
) -> None:
    """Serve the applications of deploy.yaml on an embedded local Ray until Ctrl-C."""
    from detserve.export.defaults import ensure_default_models
    from detserve.runtime.defaults import DEFAULT_MODELS
    from detserve.serve.run import load_config, main as run_server

    names = [a.args.get("model") for a in load_config(config).applications if not app_name or a.name in app_name]
    defaults = tuple(n for n in names if n in DEFAULT_MODELS)
    if defaults:  # export once here, not in every replica
        ensure_default_models(defaults)
    run_server(config, host, port, app_name)


@app.command(context_settings={"allow_extra_args": True, "ignore_unknown_options": True})
def bench(ctx: typer.Context) -> None:
    """Benchmarks: raw engine, baseline, detserve, peers, side by side (options: `detserve bench --help`)."""
    from detserve.benchmarks.run import main as run_bench

    raise typer.Exit(run_bench(list(ctx.args)))


def main() -> None:  # pragma: no cover - console entry
    app()


if __name__ == "__main__":  # pragma: no cover
    sys.exit(app())
