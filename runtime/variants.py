"""Which artifact of an export folder to serve: the exact one, or a faster variant whose accuracy gate passed.

An export folder holds the exact artifact (the manifest's own, checked for
parity against the source model) and may hold variants of the same model
(``manifest.variants``: int8 for onnxruntime's CPU provider, TensorRT
engines), each with the accuracy gate it passed at export. ``precision``
says which one runs:

- ``fp32``: the exact artifact, always (the default; the name is the CPU
  pods' case: on a GPU pod exported with ``--precision fp16`` it is that
  fp16 artifact);
- ``int8``: the int8 variant for this device; refused when there is none or
  its gate did not pass;
- ``auto``: the fastest of the exact artifact and the variants whose gate
  passed and that run on this device, by a short timing of each at the
  batch sizes the server may run, alternating between them. A variant
  replaces the exact artifact only when it is faster at every one of those
  sizes: the choice is measured, never assumed.

The timing is a function argument (``measure``), so tests drive the choice
with fixed figures instead of the wall clock.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Callable, Literal, Sequence

import numpy as np

from detserve.runtime.manifest import Manifest, ManifestError, Variant, exact_variant_name, variant_manifest

log = logging.getLogger("detserve")

PrecisionChoice = Literal["auto", "fp32", "int8"]
PRECISION_CHOICES: tuple[str, ...] = ("auto", "fp32", "int8")

#: The batch sizes timed for ``auto``: the sizes a server may run (capped by the artifact's max batch).
DEFAULT_BATCH_SIZES = (1, 2, 4, 8)
#: Rounds of the start-up timing: each round times every candidate once at every size, in turn.
TIMING_ROUNDS = 3


@dataclass(frozen=True)
class Candidate:
    """One artifact that could serve: its name among variants, and the manifest that loads it."""

    name: str
    manifest: Manifest
    variant: Variant | None = None  # None: the exact artifact


@dataclass
class Choice:
    """What runs and why: the answer to ``precision``, for /info and the start-up log."""

    asked: str
    variant: str
    precision: str
    reason: str
    #: ``auto`` only: candidate -> {batch size: ms per image}, the median of the rounds
    ms_per_image: dict[str, dict[int, float]] = field(default_factory=dict)

    def describe(self) -> dict:
        return {
            "asked": self.asked, "variant": self.variant, "precision": self.precision, "reason": self.reason,
            "ms_per_image": {name: {str(k): v for k, v in costs.items()} for name, costs in self.ms_per_image.items()},
        }  # fmt: skip


def runs_here(variant: Variant, device: str) -> bool:
    """Whether ``variant`` is meant for this device: CPU variants on ``cpu``, GPU ones on ``cuda*``."""
    return (variant.target == "cpu") == (device == "cpu")


def gate_passed(variant: Variant) -> bool:
    return variant.gate is not None and variant.gate.passed


def exact_candidate(manifest: Manifest) -> Candidate:
    return Candidate(exact_variant_name(manifest), manifest.model_copy(update={"variants": []}))


def candidates(manifest: Manifest, device: str) -> list[Candidate]:
    """The exact artifact first, then every variant for this device whose gate passed."""
    found = [exact_candidate(manifest)]
    for variant in manifest.variants:
        if runs_here(variant, device) and gate_passed(variant):
            found.append(Candidate(variant.name, variant_manifest(manifest, variant), variant))
    return found


def int8_candidate(manifest: Manifest, device: str) -> Candidate:
    """The int8 variant for this device; raises with the fix when there is none that passed its gate."""
    mine = [v for v in manifest.variants if v.precision == "int8" and runs_here(v, device)]
    # A built engine beats the QDQ graph it was built from.
    mine.sort(key=lambda v: v.format != "tensorrt")
    passed = [v for v in mine if gate_passed(v)]
    if passed:
        return Candidate(passed[0].name, variant_manifest(manifest, passed[0]), passed[0])
    if mine:
        why = mine[0].gate.reason if mine[0].gate else "it has no gate figures"
        raise ManifestError(f"precision int8: the {mine[0].name} variant did not pass its accuracy gate ({why}); "
                            "serve precision fp32, or re-export with --calibration/--val images of your own")  # fmt: skip
    where = "CPU" if device == "cpu" else "GPU"
    raise ManifestError(
        f"precision int8: the export folder holds no int8 variant for a {where}; export one with "
        f"`detserve export --precision int8 ...`, or serve precision fp32"
    )


def exact_choice(manifest: Manifest) -> Choice:
    """``precision: fp32``: the manifest's own artifact, whatever variants the folder holds."""
    return Choice("fp32", exact_variant_name(manifest), manifest.precision, "the exact artifact was asked for")


def fastest(costs: dict[str, dict[int, float]], exact: str) -> tuple[str, str]:
    """(name, why) of the candidate to run, from ms per image per batch size.

    A variant wins only when it is cheaper than the exact artifact at every
    batch size timed; among those, the lowest mean cost wins.
    """
    reference = costs[exact]
    sizes = sorted(reference)
    faster = {
        name: float(np.mean([c[b] for b in sizes]))
        for name, c in costs.items()
        if name != exact and all(c.get(b, float("inf")) < reference[b] for b in sizes)
    }
    if not faster:
        return exact, f"no variant was faster than {exact} at every batch size {sizes}"
    best = min(faster, key=faster.get)
    ratio = float(np.mean([reference[b] / costs[best][b] for b in sizes]))
    return best, f"{best} was faster than {exact} at every batch size {sizes} ({ratio:.2f}x on average)"


def choose(
    manifest: Manifest,
    precision: str,
    device: str,
    measure: Callable[[list[Candidate], Sequence[int]], dict[str, dict[int, float]]] | None = None,
    batch_sizes: Sequence[int] | None = None,
) -> tuple[Candidate, Choice]:
    """The candidate to serve for ``precision`` on ``device``, and the record of why.

    ``measure(candidates, sizes)`` returns ms per image per size for each
    candidate's name; only ``auto`` with at least one passing variant calls it.
    """
    if precision not in PRECISION_CHOICES:
        raise ManifestError(f"unknown precision {precision!r}; choose one of {', '.join(PRECISION_CHOICES)}")
    exact = exact_candidate(manifest)
    if precision == "fp32":
        return exact, exact_choice(manifest)
    if precision == "int8":
        picked = int8_candidate(manifest, device)
        return picked, Choice(precision, picked.name, "int8", "int8 was asked for; its accuracy gate passed")
    pool = candidates(manifest, device)
    if len(pool) == 1:
        return exact, Choice(precision, exact.name, exact.manifest.precision, "no variant for this device passed its accuracy gate")
    sizes = sorted({min(b, manifest.batch.max) for b in (batch_sizes or DEFAULT_BATCH_SIZES) if b >= 1})
    if measure is None:
        raise ValueError("precision auto needs a measure function to time the candidates")
    costs = measure(pool, sizes)
    name, why = fastest(costs, exact.name)
    picked = next(c for c in pool if c.name == name)
    return picked, Choice(precision, picked.name, picked.manifest.precision, why, costs)


def timing_input(manifest: Manifest, seed: int = 0) -> np.ndarray:
    """An image of the model's full input size with texture (noise), so a two-stage model does its usual work."""
    spec = manifest.input
    side = spec.imgsz or spec.max_size or spec.min_size or 640
    return np.random.default_rng(seed).integers(0, 256, (side, side, 3), dtype=np.uint8)


def time_engines(
    runs: dict[str, Callable[[int], object]], sizes: Sequence[int], rounds: int = TIMING_ROUNDS
) -> dict[str, dict[int, float]]:
    """ms per image of each ``runs[name](batch)``, per size: one warm-up call each, then ``rounds`` rounds in turn.

    Alternating (A, B, A, B ...) rather than all of A then all of B, so a change
    in the machine's load during the timing lands on every candidate alike; the
    median of the rounds drops a round that was disturbed.
    """
    for run in runs.values():
        run(1)
    samples: dict[str, dict[int, list[float]]] = {name: {b: [] for b in sizes} for name in runs}
    for _ in range(rounds):
        for b in sizes:
            for name, run in runs.items():
                start = time.perf_counter()
                run(b)
                samples[name][b].append(1000 * (time.perf_counter() - start) / b)
    return {name: {b: round(float(np.median(v)), 3) for b, v in per.items()} for name, per in samples.items()}
