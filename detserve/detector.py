"""The request path, one stage per line: decode -> preprocess -> engine -> postprocess.

``Detector`` owns an engine and the manifest that describes it. Each stage is a
public method, so the server can run decode and preprocessing of the next batch
in threads while the engine runs this one; ``detect`` chains them for everyone
else. The engine can be onnxruntime, TensorRT or torch without any stage
noticing.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np

from detserve import images as imagelib
from detserve.engines import Engine, load_engine
from detserve.manifest import Manifest, read_manifest
from detserve.postprocess import DetectParams, Detections, clip, filter_detections, unletterbox, yolo_nms
from detserve.preprocess import Geometry, pack, prepare


@dataclass
class Prepared:
    """Model-ready input: one tensor per engine call, and each image's geometry."""

    tensors: list[np.ndarray]
    geometries: list[Geometry]


class Detector:
    """A model loaded from an export folder, ready to turn images into boxes."""

    def __init__(
        self,
        folder: str | Path,
        *,
        backend: str = "auto",
        device: str = "auto",
        threads: int = 1,
        manifest: Manifest | None = None,
        engine: Engine | None = None,
    ):
        self.folder = Path(folder)
        self.manifest = manifest or read_manifest(self.folder)
        self.engine = engine or load_engine(self.folder, backend=backend, device=device, threads=threads, manifest=self.manifest)
        self.labels = dict(self.manifest.labels)

    # --- defaults -------------------------------------------------------
    def params(self, conf: float | None = None, iou: float | None = None, max_det: int | None = None, **kw) -> DetectParams:
        """Request settings, falling back to the manifest's defaults."""
        d = self.manifest.defaults
        return DetectParams(
            conf=d.get("conf", 0.25) if conf is None else float(conf),
            iou=d.get("iou", 0.45) if iou is None else float(iou),
            max_det=int(d.get("max_det", 300)) if max_det is None else int(max_det),
            **kw,
        )

    def describe(self) -> dict:
        m = self.manifest
        return {"name": m.name, "version": m.artifact_sha256[:12], "family": m.family, "backend": self.engine.name, "device": self.engine.device}

    # --- stages ---------------------------------------------------------
    def decode(self, data: imagelib.ImageInput, limits: imagelib.Limits = imagelib.Limits()) -> np.ndarray:
        return imagelib.decode(data, limits)

    def preprocess(self, images: Sequence[np.ndarray]) -> Prepared:
        spec = self.manifest.input
        model_images, geometries = prepare(list(images), spec)
        dtype = np.float16 if spec.dtype == "float16" else np.float32
        if self.manifest.batch.max == 1 or spec.resize == "in_graph":
            tensors = [pack([image], spec.scale, dtype) for image in model_images]
        else:
            step = self.manifest.batch.max
            tensors = [pack(model_images[i : i + step], spec.scale, dtype) for i in range(0, len(model_images), step)]
        return Prepared(tensors, geometries)

    def join(self, parts: Sequence[Prepared]) -> Prepared:
        """Merge preprocessed requests into as few engine calls as the artifact allows (the server's batch)."""
        geometries = [g for p in parts for g in p.geometries]
        tensors = [t for p in parts for t in p.tensors]
        if self.manifest.input.resize == "in_graph" or self.manifest.batch.max == 1 or len(tensors) <= 1:
            return Prepared(tensors, geometries)
        merged = np.concatenate(tensors, axis=0)
        step = self.manifest.batch.max
        return Prepared([merged[i : i + step] for i in range(0, len(merged), step)], geometries)

    def infer(self, prepared: Prepared) -> list[list[np.ndarray]]:
        return [self.engine.run(tensor) for tensor in prepared.tensors]

    def postprocess(
        self, outputs: list[list[np.ndarray]], prepared: Prepared, params: DetectParams | Sequence[DetectParams]
    ) -> list[Detections]:
        """Boxes per image on the original image. ``params`` is one for all, or one per image."""
        n = len(prepared.geometries)
        per_image = [params] * n if isinstance(params, DetectParams) else list(params)
        if self.manifest.output.kind == "yolo_raw":
            raw = np.concatenate([out[0] for out in outputs], axis=0)
            results: list[Detections] = [Detections()] * n
            # NMS once per distinct setting (usually one) over all its images.
            for setting in dict.fromkeys(per_image):
                idx = [i for i, p in enumerate(per_image) if p == setting]
                for i, det in zip(idx, yolo_nms(raw[idx], setting)):
                    results[i] = unletterbox(det, prepared.geometries[i])
            return results
        results = []
        for (boxes, labels, scores), g, p in zip(outputs, prepared.geometries, per_image):
            det = filter_detections(Detections(boxes.reshape(-1, 4), scores.reshape(-1), labels.reshape(-1)), p)
            det.boxes = clip(det.boxes, g)
            results.append(det)
        return results

    # --- all together ---------------------------------------------------
    def detect(self, inputs: Sequence[imagelib.ImageInput], params: DetectParams | None = None, **kwargs) -> list[Detections]:
        """Boxes for each input (bytes, path, PIL image or RGB array), in input order."""
        params = params or self.params(**kwargs)
        images = [self.decode(x) for x in inputs]
        prepared = self.preprocess(images)
        return self.postprocess(self.infer(prepared), prepared, params)

    def warmup(self) -> None:
        """One tiny inference, so that the first request does not pay for lazy initialisation."""
        self.detect([np.full((64, 64, 3), 114, np.uint8)])
