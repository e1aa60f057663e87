"""The request path, one stage per line: decode -> prepare -> pack + engine -> postprocess.

``Detector`` owns an engine and the manifest that describes it. Each image is
decoded and prepared once, alone (``prepare``: letterbox or torchvision's
resize), so a server can do that in threads as requests arrive and queue the
small result; ``run`` then packs each group of same-shape images into one
tensor, once, runs the engine and post-processes. ``detect`` chains them for
everyone else. The engine can be onnxruntime, TensorRT or torch without any
stage noticing.

``precision`` picks the artifact among the export folder's variants (exact
fp32, gated int8, ...): see ``runtime/variants.py``.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np

from detserve.runtime import images as imagelib
from detserve.runtime import variants as variantlib
from detserve.runtime.engines import Engine, load_engine, resolve
from detserve.runtime.manifest import Manifest, ManifestError, read_manifest, variant_manifest
from detserve.runtime.postprocess import DetectParams, Detections, clip, filter_detections, unletterbox, yolo_nms
from detserve.runtime.preprocess import PreparedImage, pack_inputs, prepare


@dataclass
class StageTimes:
    """Seconds spent in one ``run``: packing + engine, and post-processing."""

    engine_s: float = 0.0
    postprocess_s: float = 0.0


def engine_calls(prepared: Sequence[PreparedImage], max_batch: int) -> list[list[int]]:
    """Positions of same-key images, in chunks of ``max_batch``: one engine call each.

    Only same-shape images share a call, so padding never depends on the
    neighbours: every image gets the boxes it would get alone.
    """
    groups: dict[tuple, list[int]] = {}
    for pos, image in enumerate(prepared):
        groups.setdefault(image.key, []).append(pos)
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
        precision: str = "fp32",
        batch_sizes: Sequence[int] | None = None,
        measure=None,
    ):
        """``precision``: fp32 (the exact artifact), int8, or auto (the fastest gated variant, timed here at
        ``batch_sizes``); ``measure`` replaces that timing (tests). ``engine`` forces the engine (fp32 only)."""
        self.folder = Path(folder)
        #: the export folder's manifest, variants and all; ``self.manifest`` describes what runs
        self.export_manifest = manifest or read_manifest(self.folder)
        self.manifest = self.export_manifest
        if engine is not None and precision != "fp32":
            raise ValueError(f"a given engine runs the manifest's own artifact: precision must be fp32, not {precision!r}")
        if precision == "fp32":
            self.choice = variantlib.exact_choice(self.export_manifest)
            self.engine = engine or load_engine(self.folder, backend=backend, device=device, threads=threads, manifest=self.manifest)
        else:
            self._choose(precision, backend, device, threads, batch_sizes, measure)
        self.labels = dict(self.manifest.labels)

    def _choose(self, precision: str, backend: str, device: str, threads: int, batch_sizes, measure) -> None:
        """Pick the variant for ``precision`` (timing the candidates for auto) and keep its engine loaded."""
        export = self.export_manifest
        _, where, _ = resolve(export, backend, device)
        # Only the variants this backend can run at all (a torch backend runs none of the ONNX variants).
        usable = []
        for variant in export.variants:
            try:
                resolve(variant_manifest(export, variant), backend, device)
            except ManifestError:
                continue
            usable.append(variant)
        pool_manifest = export.model_copy(update={"variants": usable})
        engines: dict[str, Engine] = {}

        def load(candidate: variantlib.Candidate) -> Engine:
            if candidate.name not in engines:
                engines[candidate.name] = load_engine(self.folder, backend=backend, device=device, threads=threads, manifest=candidate.manifest)
            return engines[candidate.name]

        def timed(pool: list[variantlib.Candidate], sizes: Sequence[int]) -> dict[str, dict[int, float]]:
            runs = {}
            for candidate in pool:
                try:
                    runs[candidate.name] = engine_runner(load(candidate), candidate.manifest)
                except Exception as exc:  # a variant that cannot load here is no candidate
                    variantlib.log.warning("detserve: variant %s does not load here (%s); not timed", candidate.name, exc)
            return variantlib.time_engines(runs, sizes)

        candidate, self.choice = variantlib.choose(pool_manifest, precision, where, measure or timed, batch_sizes)
        self.manifest = candidate.manifest if candidate.variant is not None else export
        self.engine = load(candidate)
        variantlib.log.info("detserve: precision %s -> %s (%s)", precision, self.choice.variant, self.choice.reason)

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
        return {"name": m.name, "version": m.artifact_sha256[:12], "family": m.family, "backend": self.engine.name, "device": self.engine.device,
                "precision": m.precision, "variant": self.choice.variant}  # fmt: skip

    # --- stages ---------------------------------------------------------
    def decode(self, data: imagelib.ImageInput, limits: imagelib.Limits = imagelib.Limits()) -> np.ndarray:
        return imagelib.decode(data, limits)

    def decode_reduced(self, data: imagelib.ImageInput, limits: imagelib.Limits = imagelib.Limits()) -> tuple[np.ndarray, tuple[int, int]]:
        """Decode at the smallest JPEG scale that still covers the model input (letterbox models; others: full size)."""
        spec = self.manifest.input
        return imagelib.decode_reduced(data, limits, spec.imgsz if spec.resize == "letterbox" else None)

    def prepare(self, image: np.ndarray, full_hw: tuple[int, int] | None = None) -> PreparedImage:
        """Resize one decoded image per the input contract (letterbox, or torchvision's transform)."""
        return prepare(image, self.manifest.input, full_hw)

    def run(
        self,
        prepared: Sequence[PreparedImage],
        params: DetectParams | Sequence[DetectParams],
        times: StageTimes | None = None,
    ) -> list[Detections]:
        """Boxes per image on the original image: pack each same-shape group once, run, post-process.

        ``params`` is one for all, or one per image.
        """
        per_image = [params] * len(prepared) if isinstance(params, DetectParams) else list(params)
        results: list[Detections] = [Detections()] * len(prepared)
        for members in engine_calls(prepared, self.engine.max_batch):
            start = time.perf_counter()
            outputs = self.engine.run(*pack_inputs([prepared[p] for p in members], self.manifest.input))
            mid = time.perf_counter()
            for pos, det in zip(members, self._postprocess(outputs, [prepared[p] for p in members], [per_image[p] for p in members])):
                results[pos] = det
            if times is not None:
                times.engine_s += mid - start
                times.postprocess_s += time.perf_counter() - mid
        return results

    def _postprocess(self, outputs: list[np.ndarray], images: list[PreparedImage], params: list[DetectParams]) -> list[Detections]:
        """One engine call's outputs -> boxes per image, each with its own settings."""
        results: list[Detections] = [Detections()] * len(images)
        if self.manifest.output.kind == "yolo_raw":
            # NMS once per distinct setting (usually one) over the call's images.
            for setting in dict.fromkeys(params):
                rows = [r for r, p in enumerate(params) if p == setting]
                for r, det in zip(rows, yolo_nms(outputs[0][rows], setting)):
                    results[r] = unletterbox(det, images[r].geometry)
            return results
        # padded per-image detections, already in original pixels and score order
        boxes, scores, labels, counts = outputs
        for r, image in enumerate(images):
            k = int(counts[r])
            det = filter_detections(Detections(boxes[r, :k], scores[r, :k], labels[r, :k]), params[r])
            det.boxes = clip(det.boxes, image.geometry)
            results[r] = det
        return results

    # --- all together ---------------------------------------------------
    def detect(self, inputs: Sequence[imagelib.ImageInput], params: DetectParams | None = None, **kwargs) -> list[Detections]:
        """Boxes for each input (bytes, path, PIL image or RGB array), in input order."""
        params = params or self.params(**kwargs)
        return self.run([self.prepare(self.decode(x)) for x in inputs], params)

    def warmup(self) -> None:
        """One tiny inference, so that the first request does not pay for lazy initialisation."""
        self.detect([np.full((64, 64, 3), 114, np.uint8)])


def engine_runner(engine: Engine, manifest: Manifest):
    """``run(batch)``: one engine call on ``batch`` copies of a full-size textured image (inputs packed once per size)."""
    prepared = prepare(variantlib.timing_input(manifest), manifest.input)
    packed: dict[int, tuple[np.ndarray, ...]] = {}

    def run(batch: int) -> None:
        if batch not in packed:
            packed[batch] = pack_inputs([prepared] * batch, manifest.input)
        engine.run(*packed[batch])

    return run
