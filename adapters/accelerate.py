"""``detserve export --adapter DIR``: a user's adapter's weights on detserve's fast path, checked against the adapter itself.

When the weights an adapter loads (its model's ``weights_filename``, or a file
named with ``--weights``) are an Ultralytics YOLO checkpoint or a torchvision
Faster R-CNN state_dict, detserve can export them (``export.pipeline``, with
its own parity check against the source library) and serve the export instead
of the adapter's Python. But the adapter is the reference a user trusts, not
the library: it may decode, rotate, resize or threshold differently. So the
export is then run beside the adapter as written (its ``prepare_item_func``
and ``predict``, offline) on the parity images, and every adapter box must be
matched by an export box of the same label at IoU >= 0.99 (the export's own
threshold). What differs is listed, image by image, with the likeliest reason;
the figures go to ``adapter-parity.json`` in the export folder, which
``detserve serve --adapter DIR --accelerated`` reads before serving it.

The export serves with the thresholds the adapter applies: the configuration
values it reads (``user_adapter.parameter_keys``), else the source library's
own defaults (Ultralytics predict: conf 0.25, iou 0.7, max_det 300; torchvision:
its box_score_thresh 0.05 and 100 detections). They are written into the
export's manifest as its defaults.
"""

from __future__ import annotations

import io
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from detserve.adapters.dataloop_app import PARITY_FILE, AdapterApp, AppModel, export_folder, read_app
from detserve.adapters.user_adapter import AdapterError, RequestItem, annotations_json, load_adapter, parameter_keys
from detserve.runtime.images import probe
from detserve.runtime.postprocess import Detections

#: The differences kept in the report (all are counted).
MAX_LISTED = 40

#: The source libraries' own thresholds, for an adapter that sets none (Ultralytics' predict; torchvision's model).
LIBRARY_DEFAULTS = {
    "yolo": {"conf": 0.25, "iou": 0.7, "max_det": 300},
    "fasterrcnn": {"conf": 0.05, "iou": 0.5, "max_det": 100},
}


@dataclass
class Difference:
    """One box found by one side and not matched by the other."""

    image: int
    side: str  # "adapter" (the export misses it) or "export" (the adapter has no such box)
    label: str
    box: list[float]
    score: float
    best_iou: float  # with any box of the other side
    reason: str


@dataclass
class AdapterParity:
    """The export against the adapter as written, on the same image files."""

    images: int = 0
    adapter_boxes: int = 0
    export_boxes: int = 0
    matched: int = 0
    max_box_diff_px: float = 0.0
    max_score_diff: float = 0.0
    threshold: float = 0.99
    iou: float = 0.99
    thresholds: dict = field(default_factory=dict)  # conf, iou, max_det the export serves with, and where each came from
    differences: list[Difference] = field(default_factory=list)
    unlisted: int = 0

    @property
    def matched_share(self) -> float:
        return 1.0 if self.adapter_boxes == 0 else self.matched / self.adapter_boxes

    @property
    def passed(self) -> bool:
        return self.matched_share >= self.threshold

    def to_json(self) -> dict:
        return {**asdict(self), "matched_share": round(self.matched_share, 6), "passed": self.passed}

    def summary(self) -> str:
        return (f"adapter parity: {self.matched}/{self.adapter_boxes} of the adapter's boxes matched by the export "
                f"({self.matched_share:.1%}, same label, IoU >= {self.iou}) on {self.images} images; the export found "
                f"{self.export_boxes}; max box diff {self.max_box_diff_px:.3f} px, max score diff {self.max_score_diff:.2e}")  # fmt: skip


def adapter_weights(app: AdapterApp, model: AppModel, weights: Path | None = None) -> Path:
    """The weights the adapter loads: ``weights`` if given, else its model's ``weights_filename`` in the artifacts."""
    if weights is not None:
        path = Path(weights)
    elif model.weights_filename:
        path = model.artifacts / model.weights_filename
    else:
        raise AdapterError(f"{app.folder / 'dataloop.json'}: model {model.name} has no weights_filename; name the checkpoint with --weights")
    if not path.is_file():
        raise AdapterError(f"no weights file at {path} (model {model.name}'s weights_filename); name the checkpoint with --weights")
    return path


def weights_family(weights: Path) -> str:
    """``yolo`` for an Ultralytics checkpoint, ``fasterrcnn`` for a torchvision Faster R-CNN state_dict; else AdapterError."""
    from detserve.runtime.sources import SourceError, load_yolo, read_fasterrcnn_checkpoint

    try:
        read_fasterrcnn_checkpoint(weights, None)
        return "fasterrcnn"
    except SourceError:
        pass
    try:
        load_yolo(weights)
        return "yolo"
    except SourceError:
        pass
    raise AdapterError(f"{weights} is neither an Ultralytics YOLO checkpoint nor a torchvision Faster R-CNN state_dict: detserve accelerates only those; serve the adapter as written")


def adapter_thresholds(app: AdapterApp, model: AppModel, family: str) -> dict:
    """The conf/iou/max_det the adapter applies: its configuration's values for the keys it reads, else the library's."""
    keys, settings = parameter_keys(app, model), model.configuration
    out, origin = {}, {}
    for param, default in LIBRARY_DEFAULTS[family].items():
        key = keys.get(param)
        if key is not None and settings.get(key) is not None:
            out[param], origin[param] = float(settings[key]), f"configuration {key}"
        else:
            out[param], origin[param] = float(default), f"{'Ultralytics predict' if family == 'yolo' else 'torchvision'} default"
    out["max_det"] = int(out["max_det"])
    return {**out, "from": origin}


def adapter_labels(model: AppModel, family: str) -> list[str] | None:
    """Labels for the export: a Faster R-CNN adapter's ``id_to_label_map`` (ids 1..K); YOLO keeps the checkpoint's names."""
    mapping = model.configuration.get("id_to_label_map") if family == "fasterrcnn" else None
    if mapping:
        return [str(mapping[key]) for key in sorted(mapping, key=int)]
    return None


def accelerate(
    folder: str | Path,
    model_name: str | None = None,
    *,
    weights: Path | None = None,
    out: Path | None = None,
    imgsz: int | None = None,
    force: bool = False,
    threshold: float = 0.99,
    images: list[bytes] | None = None,
    quiet: bool = False,
) -> tuple[Path, AdapterParity]:
    """Export the adapter's weights, check the export against the adapter, record the figures; (export folder, figures)."""
    from detserve.export.pipeline import ExportRequest, export_model
    from detserve.runtime.manifest import write_manifest

    app = read_app(folder)
    model = app.model(model_name)
    source = adapter_weights(app, model, weights)
    family = weights_family(source)
    thresholds = adapter_thresholds(app, model, family)
    out = Path(out) if out is not None else export_folder(app, model)
    manifest = export_model(ExportRequest(
        model=family, weights=source, out=out, labels=adapter_labels(model, family), imgsz=imgsz,
        name=model.name, force=force, quiet=quiet,
    ))  # fmt: skip
    manifest = manifest.model_copy(update={"defaults": {k: thresholds[k] for k in ("conf", "iou", "max_det")}})
    write_manifest(out, manifest)
    parity = adapter_parity(app, model, out, images if images is not None else parity_files(), threshold)
    parity.thresholds = thresholds
    (out / PARITY_FILE).write_text(json.dumps(parity.to_json(), indent=1) + "\n")
    return out, parity


def parity_files() -> list[bytes]:
    """The export's parity images (photos and generated scenes) as PNG files: what a request would send."""
    from PIL import Image

    from detserve.export.reference import parity_images

    out = []
    for image in parity_images():
        buffer = io.BytesIO()
        Image.fromarray(image).save(buffer, format="PNG")
        out.append(buffer.getvalue())
    return out


def adapter_parity(app: AdapterApp, model: AppModel, export: Path, images: list[bytes], threshold: float = 0.99) -> AdapterParity:
    """The adapter as written and the export, on the same image files: matched boxes, and each difference with its reason."""
    from detserve.export.parity import box_iou, compare, matches
    from detserve.runtime.detector import Detector

    adapter = load_adapter(app, model)
    detector = Detector(export, backend="onnxruntime", device="cpu")
    params = detector.params()
    ids = {name: i for i, name in detector.labels.items()}
    names = {**{i: name for name, i in ids.items()}, -1: "(a label the export does not know)"}
    result = AdapterParity(threshold=threshold)
    for index, data in enumerate(images):
        [collection] = annotations_json(adapter.predict([adapter.prepare_item_func(RequestItem.of(data, probe(data)))]), 1)
        theirs = detections_of(collection, ids)
        [ours] = detector.detect([data], params)
        one = compare(theirs, ours, result.iou)
        result.images += 1
        result.adapter_boxes += one.source_boxes
        result.export_boxes += one.artifact_boxes
        result.matched += one.matched
        result.max_box_diff_px = max(result.max_box_diff_px, one.max_box_diff_px)
        result.max_score_diff = max(result.max_score_diff, one.max_score_diff)
        paired = matches(theirs, ours, result.iou)
        ious = box_iou(theirs.boxes, ours.boxes) if len(theirs) and len(ours) else np.zeros((len(theirs), len(ours)))
        turned = probe(data).orientation
        for side, dets, done, overlaps, other in (("adapter", theirs, {s for s, _ in paired}, ious, ours), ("export", ours, {a for _, a in paired}, ious.T, theirs)):
            for k in range(len(dets)):
                if k in done:
                    continue
                best = int(np.argmax(overlaps[k])) if overlaps.shape[1] else -1
                best_iou = float(overlaps[k, best]) if best >= 0 else 0.0
                reason = _reason(side, dets, k, other, best, best_iou, params.conf, turned, names)
                if len(result.differences) < MAX_LISTED:
                    result.differences.append(Difference(index, side, names.get(int(dets.class_ids[k]), "?"), [round(float(v), 2) for v in dets.boxes[k]],
                                                         round(float(dets.scores[k]), 4), round(best_iou, 4), reason))  # fmt: skip
                else:
                    result.unlisted += 1
    return result


def detections_of(annotations: list[dict], ids: dict[str, int]) -> Detections:
    """Box annotations (Dataloop JSON) as Detections, classes by ``ids`` (label -> id; an unknown label is -1)."""
    boxes, scores, classes = [], [], []
    for a in annotations:
        if a.get("type") != "box":
            continue
        (p1, p2) = a["coordinates"][:2]
        boxes.append((min(p1["x"], p2["x"]), min(p1["y"], p2["y"]), max(p1["x"], p2["x"]), max(p1["y"], p2["y"])))
        scores.append(float(((a.get("metadata") or {}).get("user") or {}).get("model", {}).get("confidence", 1.0)))
        classes.append(ids.get(str(a["label"]), -1))
    return Detections(np.asarray(boxes, np.float32).reshape(-1, 4), np.asarray(scores, np.float32), np.asarray(classes, np.int64))


def _reason(side: str, dets: Detections, k: int, other: Detections, best: int, best_iou: float, conf: float, turned: int, names: dict) -> str:
    """The likeliest reason one side's box has no counterpart on the other."""
    if turned not in (1, 0):
        return (f"the image has EXIF orientation {turned}: detserve turns it upright before the model sees it; an adapter that "
                "opens it with Pillow and does not call ImageOps.exif_transpose (Ultralytics does) sees it as stored")
    if int(dets.class_ids[k]) == -1:
        return f"the adapter's label is not one of the export's ({', '.join(v for i, v in names.items() if i >= 0)}): check labels/id_to_label_map"
    if best >= 0 and best_iou >= 0.5 and int(other.class_ids[best]) != int(dets.class_ids[k]):
        return f"the other side has a {names.get(int(other.class_ids[best]), '?')} there (IoU {best_iou:.2f}): the labels differ"
    if best >= 0 and best_iou >= 0.5:
        shift = float(np.abs(dets.boxes[k] - other.boxes[best]).max())
        return (f"the other side's box there is off by up to {shift:.1f} px (IoU {best_iou:.3f} < 0.99): the input is resized or "
                "padded differently (input size, letterbox rectangle or square, resampling)")
    if abs(float(dets.scores[k]) - conf) < 0.05:
        return f"its score {float(dets.scores[k]):.3f} is next to the threshold {conf:g}: a tiny numeric difference puts it on the other side"
    missing = "the export" if side == "adapter" else "the adapter"
    return f"{missing} has no box there: different thresholds (conf/iou/max_det) or a different input"
