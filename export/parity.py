"""Judge an exported model against its source: same boxes, same labels, scores within tolerance.

``compare`` matches each source box to an artifact box of the same class with
IoU >= 0.99 (greedy, best IoU first) and reports the share matched and the
largest coordinate and score differences among matched pairs. The figures go
into the manifest.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np

from detserve.runtime.manifest import Parity
from detserve.runtime.postprocess import DetectParams, Detections


@dataclass
class ParityResult:
    images: int = 0
    source_boxes: int = 0
    artifact_boxes: int = 0
    matched: int = 0
    max_box_diff_px: float = 0.0
    max_score_diff: float = 0.0

    @property
    def matched_share(self) -> float:
        return 1.0 if self.source_boxes == 0 else self.matched / self.source_boxes

    def add(self, other: "ParityResult") -> None:
        self.images += other.images
        self.source_boxes += other.source_boxes
        self.artifact_boxes += other.artifact_boxes
        self.matched += other.matched
        self.max_box_diff_px = max(self.max_box_diff_px, other.max_box_diff_px)
        self.max_score_diff = max(self.max_score_diff, other.max_score_diff)


def box_iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Pairwise IoU of xyxy boxes, ``[len(a), len(b)]``."""
    a = a.astype(np.float64)[:, None]
    b = b.astype(np.float64)[None]
    iw = (np.minimum(a[..., 2], b[..., 2]) - np.maximum(a[..., 0], b[..., 0])).clip(0)
    ih = (np.minimum(a[..., 3], b[..., 3]) - np.maximum(a[..., 1], b[..., 1])).clip(0)
    inter = iw * ih
    area_a = (a[..., 2] - a[..., 0]) * (a[..., 3] - a[..., 1])
    area_b = (b[..., 2] - b[..., 0]) * (b[..., 3] - b[..., 1])
    return inter / np.maximum(area_a + area_b - inter, 1e-12)


def matches(source: Detections, artifact: Detections, iou: float = 0.99) -> list[tuple[int, int]]:
    """(source index, artifact index) of each matched pair: same class, IoU >= ``iou``, greedy, best IoU first."""
    if not len(source) or not len(artifact):
        return []
    ious = box_iou(source.boxes, artifact.boxes)
    ious[source.class_ids[:, None] != artifact.class_ids[None, :]] = 0.0
    used_s: set[int] = set()
    used_a: set[int] = set()
    pairs = []
    for flat in np.argsort(-ious, axis=None):
        s, a = divmod(int(flat), ious.shape[1])
        if ious[s, a] < iou:
            break
        if s in used_s or a in used_a:
            continue
        used_s.add(s)
        used_a.add(a)
        pairs.append((s, a))
    return pairs


def compare(source: Detections, artifact: Detections, iou: float = 0.99) -> ParityResult:
    """Match one image's source detections to the artifact's."""
    result = ParityResult(images=1, source_boxes=len(source), artifact_boxes=len(artifact))
    for s, a in matches(source, artifact, iou):
        result.matched += 1
        result.max_box_diff_px = max(result.max_box_diff_px, float(np.abs(source.boxes[s] - artifact.boxes[a]).max()))
        result.max_score_diff = max(result.max_score_diff, float(abs(source.scores[s] - artifact.scores[a])))
    return result


def compare_all(sources: list[Detections], artifacts: list[Detections], iou: float = 0.99) -> ParityResult:
    total = ParityResult()
    for s, a in zip(sources, artifacts, strict=True):
        total.add(compare(s, a, iou))
    return total


def measure(
    detect: Callable[[np.ndarray, DetectParams], Detections],
    reference: Callable[[np.ndarray], Detections],
    images: list[np.ndarray],
    params: DetectParams,
    *,
    threshold: float,
    what: str = "artifact",
    quiet: bool = False,
) -> Parity:
    """Run the artifact (``detect``) and the source (``reference``) on ``images``; the figures for the manifest."""
    from detserve.runtime.progress import console, track

    sources, artifacts = [], []
    for image in track(images, f"Checking parity (source vs {what})", quiet=quiet):
        sources.append(reference(image))
        artifacts.append(detect(image, params))
    result = compare_all(sources, artifacts)
    parity = Parity(
        images=result.images,
        source_boxes=result.source_boxes,
        matched_share=round(result.matched_share, 6),
        max_box_diff_px=round(result.max_box_diff_px, 6),
        max_score_diff=round(result.max_score_diff, 8),
        threshold=threshold,
        conf=params.conf,
        passed=result.matched_share >= threshold,
    )
    if not quiet:
        console.print(
            f"parity ({what}): {result.matched}/{result.source_boxes} source boxes matched "
            f"({parity.matched_share:.1%}) on {result.images} images, max box diff "
            f"{parity.max_box_diff_px:.4f} px, max score diff {parity.max_score_diff:.2e}"
        )
        if result.source_boxes == 0:
            console.print(
                "[yellow]warning:[/] the source model found no boxes on the parity images (random init?), "
                "so parity is trivially met; check with a trained model"
            )
    return parity
