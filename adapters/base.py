"""One Dataloop adapter contract for every detserve model.

``DetectionAdapter`` is a ``dtlpy.BaseModelAdapter`` whose ``load`` builds a
:class:`detserve.Detector` from an export folder (manifest + artifact) and whose
``predict`` runs the whole batch through the engine in one call and writes
``dl.Box`` annotations. The YOLO and Faster R-CNN adapters only say which
family they are and how they train.

Configuration keys (``model.configuration``), all optional:

===================  =====================================================
``conf_thres``       score threshold (really applied: values below the
                     model's default lower it)
``iou_thres``        NMS IoU (YOLO; Faster R-CNN's NMS is in its graph)
``max_det``          detections per image
``imgsz``            input size used when weights are exported on load
``batch_size``       items per ``predict`` call (dtlpy's predict_items)
``device``           auto | cpu | cuda | cuda:N
``backend``          auto | onnxruntime | tensorrt | torch
``half``             export/serve fp16 on GPU pods
``precision``        fp32 | int8 | auto: which of the export's variants runs
                     (runtime/variants.py, docs/precision.md)
``labels``           class names, in class-id order (no background)
``id_to_label_map``  {class id: name}; authoritative when given
``artifact``         sub-folder of the model's artifacts holding the export
``weights_filename`` raw weights (.pt / .pth) to export on load instead
``threads``          CPU threads of the engine
``arch``             Faster R-CNN architecture when exporting raw weights
``epochs``           training epochs (``train_model``)
``train_batch_size`` training batch size
``train_device``     training device (YOLO: cpu | 0 | cuda:0)
===================  =====================================================

dtlpy's own keys (``include_background``, ``upload_annotations``, ...,
``predict_embed_subset_limit``, ``predict_embed_timeout``) must be present too:
dtlpy writes a missing key back to the platform. Both ``dataloop.json``
manifests declare every key with its default (tests/test_dataloop_manifests.py).

``evaluate`` (called by dtlpy's ``evaluate_model`` after it has predicted the
filtered items) scores this model's boxes against the ground truth on the same
items with COCO metrics (``detserve.training.metrics``) and publishes them with
``model.metrics.create`` as ``dl.PlotSample``s.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np

from detserve.runtime import offline

offline.apply()

import dtlpy as dl  # noqa: E402

from detserve.runtime.images import ImageError, decode  # noqa: E402
from detserve.runtime.manifest import MANIFEST_NAME, ManifestError  # noqa: E402
from detserve.runtime.postprocess import Detections  # noqa: E402

log = logging.getLogger("detserve.adapters")

CONFIG_KEYS = (
    "conf_thres", "iou_thres", "max_det", "imgsz", "batch_size", "device", "backend",
    "half", "precision", "labels", "id_to_label_map", "artifact", "weights_filename",
    "threads", "arch", "epochs", "train_batch_size", "train_device",
)  # fmt: skip

#: The figures ``evaluate`` publishes as model metrics (``dl.PlotSample(figure, legend=dataset name, x=0, y)``).
METRIC_FIGURES = ("mAP50-95", "mAP50", "mAP75", "precision", "recall")
#: Per-label AP50-95: one sample per label (legend = the label).
PER_LABEL_FIGURE = "AP50-95 per label"


def label_map(manifest_labels: dict[int, str], configuration: dict) -> dict[int, str]:
    """Class id -> label name: ``id_to_label_map`` wins, then ``labels``, then the manifest."""
    mapping = configuration.get("id_to_label_map")
    if mapping:
        return {int(k): str(v) for k, v in mapping.items()}
    labels = configuration.get("labels")
    if labels:
        ids = sorted(manifest_labels)  # YOLO 0..K-1; torchvision 1..K (0 is background)
        if len(labels) != len(ids):
            raise ValueError(f"configuration 'labels' has {len(labels)} names but the model has {len(ids)} classes")
        return {i: str(name) for i, name in zip(ids, labels)}
    return dict(manifest_labels)


def to_collection(det: Detections, labels: dict[int, str], model_name: str, model_id: str | None) -> dl.AnnotationCollection:
    """Detections -> a Dataloop AnnotationCollection of boxes with model_info."""
    collection = dl.AnnotationCollection()
    for (left, top, right, bottom), score, cls in zip(det.boxes.tolist(), det.scores.tolist(), det.class_ids.tolist()):
        collection.add(
            annotation_definition=dl.Box(left=left, top=top, right=right, bottom=bottom, label=labels.get(cls, str(cls))),
            model_info={"name": model_name, "confidence": float(min(max(score, 0.0), 1.0)), "model_id": model_id},
        )
    return collection


def metric_samples(metrics, legend: str) -> list[dl.PlotSample]:
    """``DetectionMetrics`` as the samples dtlpy's ``model.metrics.create`` takes."""
    values = {**metrics.stats, "precision": metrics.precision, "recall": metrics.recall}
    samples = [dl.PlotSample(figure=name, legend=legend, x=0, y=float(values[name])) for name in METRIC_FIGURES]
    samples += [
        dl.PlotSample(figure=PER_LABEL_FIGURE, legend=label, x=0, y=float(ap))
        for label, ap in metrics.per_label_ap.items()
        if ap is not None
    ]
    return samples


def find_export(local_path: Path, configuration: dict) -> Path | None:
    """The export folder inside a model's artifacts, if there is one."""
    artifact = configuration.get("artifact")
    candidates = [local_path / artifact] if artifact else []
    candidates += [local_path, local_path / "detserve"]
    for folder in candidates:
        if (folder / MANIFEST_NAME).is_file():
            return folder
    return None


def _image_boxes(boxes, labels, scores=None, *, item: dict):
    from detserve.training.metrics import ImageBoxes

    system = (item.get("metadata") or {}).get("system") or {}
    return ImageBoxes(boxes, labels, scores, int(system.get("width") or 0), int(system.get("height") or 0))


class DetectionAdapter(dl.BaseModelAdapter):
    """Shared by YoloAdapter and FasterRCNNAdapter; subclasses set ``family``."""

    family: str = ""

    def __init__(self, model_entity: dl.Model | None = None, configuration: dict | None = None):
        self.detector = None
        self.labels: dict[int, str] = {}
        self.trained_weights: Path | None = None  # set by train()
        self.last_metrics = None  # set by evaluate()
        # Used when there is no model entity (Ray Serve, the CLI, tests).
        self.local_configuration = dict(configuration or {})
        # dtlpy warns about model_info names on every construction; not news to our users.
        dtlpy_logger = logging.getLogger("ModelAdapter")
        level = dtlpy_logger.level
        dtlpy_logger.setLevel(logging.ERROR)
        try:
            super().__init__(model_entity)
        finally:
            dtlpy_logger.setLevel(level)

    @classmethod
    def from_export(cls, folder: str | Path, **configuration) -> "DetectionAdapter":
        """An adapter for an export folder, without a Dataloop model entity."""
        adapter = cls(configuration=configuration)
        adapter.load(folder)
        return adapter

    # ---- configuration -------------------------------------------------
    def _config(self, key: str, default: Any = None) -> Any:
        # A key set to null (JSON) means "not set": str(None) would be backend 'None'.
        value = self._plain_config().get(key)
        return default if value is None else value

    def _plain_config(self) -> dict:
        # dtlpy's configuration proxy calls the platform for a missing key;
        # read the entity's plain dict instead.
        if self._model_entity is None:
            return self.local_configuration
        return dict(self._model_entity.configuration or {})

    # ---- dtlpy contract -------------------------------------------------
    def load(self, local_path, **kwargs):
        """Build the engine from the export folder in ``local_path`` (or export raw weights found there)."""
        from detserve.runtime.detector import Detector

        local_path = Path(local_path)
        folder = find_export(local_path, self._plain_config())
        if folder is None:
            folder = self._export_weights(local_path)
        self.detector = Detector(
            folder,
            backend=str(self._config("backend", "auto")),
            device=str(self._config("device", "auto")),
            threads=int(self._config("threads", 1)),
            precision=str(self._config("precision", "fp32")),
        )
        if self.detector.manifest.family != self.family:
            raise ManifestError(f"{folder} holds a {self.detector.manifest.family} model; {type(self).__name__} serves {self.family}")
        self.labels = label_map(self.detector.labels, self._plain_config())
        self.model = self.detector
        log.info("loaded %s", self.detector.describe())

    def _export_weights(self, local_path: Path) -> Path:
        name = self._config("weights_filename")
        weights = local_path / name if name else None
        if weights is None or not weights.is_file():
            raise ManifestError(
                f"no detserve export ({MANIFEST_NAME}) in {local_path} and no weights_filename to export from; "
                "upload the folder written by `detserve export` as the model's artifacts"
            )
        return self._save_export(local_path, weights)

    def _save_export(self, local_path: Path, weights: Path) -> Path:
        """Export ``weights`` into ``local_path/detserve`` (verified) and point the configuration at it."""
        from detserve.export.pipeline import ExportRequest, export_model

        out = local_path / "detserve"
        export_model(
            ExportRequest(
                model=self.family,  # type: ignore[arg-type]
                weights=weights,
                out=out,
                arch=self._config("arch"),
                labels=self._config("labels"),
                imgsz=self._config("imgsz"),
                precision="fp16" if self._config("half") else None,
                force=True,
                quiet=True,
            )
        )
        if self._model_entity is not None:
            self._model_entity.configuration = {**self._plain_config(), "artifact": "detserve", "weights_filename": weights.name}
        return out

    def save(self, local_path, **kwargs):
        """Write the weights (trained, or the loaded ones) and a fresh, verified export: servable at once."""
        import shutil

        weights = self.trained_weights or (self.detector.folder / self.detector.manifest.source.file)
        local_path = Path(local_path)
        local_path.mkdir(parents=True, exist_ok=True)
        target = local_path / f"weights{Path(weights).suffix}"
        if Path(weights).resolve() != target.resolve():  # train_model saves into train's own output folder
            shutil.copyfile(weights, target)
        self._save_export(local_path, target)

    def evaluate(self, model: dl.Model, dataset: dl.Dataset, filters: dl.Filters | None = None) -> dl.Model:
        """COCO metrics of ``model``'s boxes on the filtered items, published with ``model.metrics.create``.

        dtlpy's ``evaluate_model`` has already predicted these items (their
        boxes carry ``metadata.user.model.name``); the ground truth is every
        other box on them. The figures are kept on ``self.last_metrics``.
        """
        import json
        import tempfile

        from detserve.adapters.dtlpy_data import box_annotations

        if self.detector is None:
            raise RuntimeError("the adapter has no model: call load_from_model(model) first")
        with tempfile.TemporaryDirectory(prefix="detserve-evaluate-") as tmp:
            # The same export dtlpymetrics reads, without its platform-only scoring.
            folder = dataset.download_annotations(local_path=tmp, filters=filters, annotation_options=[], overwrite=True)
            items = [json.loads(path.read_text()) for path in sorted(Path(folder, "json").rglob("*.json"))]
        items.sort(key=lambda item: item["id"])
        truth, predicted = [], []
        for item in items:
            annotations = item.get("annotations") or []
            truth.append(_image_boxes(*box_annotations(annotations)[:2], item=item))
            predicted.append(_image_boxes(*box_annotations(annotations, model_name=model.name), item=item))
        self.last_metrics = self.score(truth, predicted)
        log.info("evaluated %s on %d items of %s: mAP50-95 %.4f, mAP50 %.4f", model.name, len(items), dataset.name,
                 self.last_metrics.map50_95, self.last_metrics.map50)  # fmt: skip
        model.metrics.create(samples=metric_samples(self.last_metrics, legend=dataset.name), dataset_id=dataset.id)
        return model

    def score(self, truth, predicted):
        """``training.metrics.coco_metrics`` over the model's labels, precision/recall at the configured ``conf_thres``."""
        from detserve.training.metrics import coco_metrics

        names = [self.labels[i] for i in sorted(self.labels)]
        unknown = sorted({label for image in truth for label in image.labels} - set(names))
        if unknown:
            log.warning("ground-truth labels %s are not the model's; they are left out of the metrics", unknown)
        conf = self.detector.params(conf=self._config("conf_thres")).conf
        return coco_metrics(truth, predicted, names, conf_thres=conf)

    def prepare_item_func(self, item: dl.Item):
        """The item as an RGB array with EXIF applied, or None (logged) when it cannot be read."""
        try:
            buffer = item.download(save_locally=False)
            return decode(buffer.getvalue() if hasattr(buffer, "getvalue") else buffer.read())
        except (ImageError, Exception) as exc:  # a bad item must not fail the batch
            log.warning("item %s: cannot read the image (%s); it gets no annotations", getattr(item, "id", "?"), exc)
            return None

    def predict(self, batch, **kwargs):
        """One AnnotationCollection of boxes per batch entry; the batch is one engine call."""
        if self.detector is None:
            raise RuntimeError("the adapter has no model: call load(local_path) first")
        params = self.detector.params(
            conf=kwargs.get("conf_thres", self._config("conf_thres")),
            iou=kwargs.get("iou_thres", self._config("iou_thres")),
            max_det=kwargs.get("max_det", self._config("max_det")),
        )
        images: list[np.ndarray | None] = []
        for entry in batch:
            if entry is None:
                images.append(None)
                continue
            try:
                images.append(decode(entry))
            except ImageError as exc:
                log.warning("skipping an unreadable image in the batch: %s", exc)
                images.append(None)
        valid = [im for im in images if im is not None]
        detections = iter(self.detector.detect(valid, params) if valid else [])
        model_name = self._model_entity.name if self._model_entity is not None else self.detector.manifest.name
        model_id = self._model_entity.id if self._model_entity is not None else None
        return [
            dl.AnnotationCollection() if im is None else to_collection(next(detections), self.labels, model_name, model_id)
            for im in images
        ]
