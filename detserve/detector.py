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
    """Model-ready input: one tensor per engine call, which images each holds, and every image's geometry."""

    tensors: list[np.ndarray]
    members: list[list[int]]  # members[k]: the image positions in tensors[k], in order
    geometries: list[Geometry]


def chunks_by_shape(images: Sequence[np.ndarray], max_batch: int) -> list[list[int]]:
    """Positions of same-shape images, in chunks of at most ``max_batch``: one engine call each."""
    groups: dict[tuple, list[int]] = {}
    for pos, image in enumerate(images):
        groups.setdefault(image.shape, []).append(pos)
    return [group[i : i + max_batch] for group in groups.values() for i in range(0, len(group), max_batch)]


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
        """Resize per the input contract and pack: one tensor per engine call (same-shape images together)."""
        spec = self.manifest.input
        model_images, geometries = prepare(list(images), spec)
        dtype = np.float16 if spec.dtype == "float16" else np.float32
        members = chunks_by_shape(model_images, self.manifest.batch.max)
        tensors = [pack([model_images[p] for p in chunk], spec.scale, dtype) for chunk in members]
        return Prepared(tensors, members, geometries)

    def join(self, parts: Sequence[Prepared]) -> Prepared:
        """Merge preprocessed requests into as few engine calls as the artifact allows (the server's batch)."""
        geometries = [g for p in parts for g in p.geometries]
        images: list[np.ndarray] = []  # back to one CHW array per image, in order, then regroup
        for part in parts:
            rows = {pos: tensor[r] for tensor, members in zip(part.tensors, part.members) for r, pos in enumerate(members)}
            images.extend(rows[i] for i in range(len(part.geometries)))
        members = chunks_by_shape(images, self.manifest.batch.max)
        return Prepared([np.stack([images[p] for p in chunk]) for chunk in members], members, geometries)

    def infer(self, prepared: Prepared) -> list[list[np.ndarray]]:
        return [self.engine.run(tensor) for tensor in prepared.tensors]

    def postprocess(
        self, outputs: list[list[np.ndarray]], prepared: Prepared, params: DetectParams | Sequence[DetectParams]
    ) -> list[Detections]:
        """Boxes per image on the original image. ``params`` is one for all, or one per image."""
        n = len(prepared.geometries)
        per_image = [params] * n if isinstance(params, DetectParams) else list(params)
        results: list[Detections] = [Detections()] * n
        for out, members in zip(outputs, prepared.members):
            if self.manifest.output.kind == "yolo_raw":
                # NMS once per distinct setting (usually one) over the chunk's images.
                for setting in dict.fromkeys(per_image[p] for p in members):
                    rows = [r for r, p in enumerate(members) if per_image[p] == setting]
                    for r, det in zip(rows, yolo_nms(out[0][rows], setting)):
                        results[members[r]] = unletterbox(det, prepared.geometries[members[r]])
            else:  # one image per call: boxes, labels, scores in original pixels
                [pos] = members
                boxes, labels, scores = out
                det = filter_detections(Detections(boxes.reshape(-1, 4), scores.reshape(-1), labels.reshape(-1)), per_image[pos])
                det.boxes = clip(det.boxes, prepared.geometries[pos])
                results[pos] = det
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
