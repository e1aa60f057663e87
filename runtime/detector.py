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

from detserve.runtime import images as imagelib
from detserve.runtime.engines import Engine, load_engine
from detserve.runtime.manifest import Manifest, read_manifest
from detserve.runtime.postprocess import DetectParams, Detections, clip, filter_detections, unletterbox, yolo_nms
from detserve.runtime.preprocess import Geometry, prepare


@dataclass
class Prepared:
    """Model-ready input: one tensor per engine call, which images each holds, and every image's geometry."""

    tensors: list[tuple[np.ndarray, ...]]  # the engine's inputs for each call
    members: list[list[int]]  # members[k]: the image positions in tensors[k], in order
    geometries: list[Geometry]


def batch_by_shape(per_image: Sequence[tuple[np.ndarray, ...]], geometries: list[Geometry], max_batch: int) -> Prepared:
    """Stack images whose input tensors have the same shape, in chunks of ``max_batch``: one engine call each.

    Only same-shape images share a call, so padding never depends on the
    neighbours: every image gets the boxes it would get alone.
    """
    groups: dict[tuple, list[int]] = {}
    for pos, inputs in enumerate(per_image):
        groups.setdefault(inputs[0].shape, []).append(pos)
    members = [group[i : i + max_batch] for group in groups.values() for i in range(0, len(group), max_batch)]
    tensors = [
        tuple(np.concatenate([per_image[p][k] for p in chunk]) for k in range(len(per_image[chunk[0]])))
        for chunk in members
    ]
    return Prepared(tensors, members, geometries)


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
        """Resize per the input contract and pack: one engine call per group of same-shape images."""
        prepared = [prepare(image, self.manifest.input) for image in images]
        return batch_by_shape([p[0] for p in prepared], [p[1] for p in prepared], self.manifest.batch.max)

    def join(self, parts: Sequence[Prepared]) -> Prepared:
        """Merge preprocessed requests into as few engine calls as the artifact allows (the server's batch)."""
        per_image: list[tuple[np.ndarray, ...]] = []
        for part in parts:  # back to one batch-of-one per image, in order, then regroup
            rows = {pos: tuple(a[r : r + 1] for a in arrays) for arrays, members in zip(part.tensors, part.members) for r, pos in enumerate(members)}
            per_image.extend(rows[i] for i in range(len(part.geometries)))
        return batch_by_shape(per_image, [g for p in parts for g in p.geometries], self.manifest.batch.max)

    def infer(self, prepared: Prepared) -> list[list[np.ndarray]]:
        return [self.engine.run(*inputs) for inputs in prepared.tensors]

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
            else:  # padded per-image detections, already in original pixels and score order
                boxes, scores, labels, counts = out
                for r, pos in enumerate(members):
                    k = int(counts[r])
                    det = filter_detections(Detections(boxes[r, :k], scores[r, :k], labels[r, :k]), per_image[pos])
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
