"""Build the compiled PyTorch engine (an AOTInductor package) from ``model.pt2``, on the target, and gate it.

The pipeline's ``--format aoti`` step, after the ONNX export and its parity:
load the torch program written at export time (``export/program.py``), cast
it to the precision (fp16 on GPU pods) with a channels-last example input on
CUDA, compile it with ``torch._inductor.aoti_compile_and_package`` for the GPU
it runs on, and check it like any artifact. Parity gates: fp32 must match the
source's boxes (``--parity-threshold``, same class, IoU >= 0.99); fp16 must
stay within 0.5 mAP point (mAP50-95 on generated scenes) of the source.

The package is keyed by target and torch version (``runtime/engines/compiled.py``);
it is never built on a GPU other than the pod's.
"""

from __future__ import annotations

import contextlib
import io
import time
import warnings
from pathlib import Path

from detserve.runtime.engines import compiled as compiled_lookup
from detserve.runtime.engines.compiled import CompiledEngine, CompiledUnavailable, package_filename
from detserve.runtime.manifest import MANIFEST_NAME, Manifest, sha256_file, write_manifest
from detserve.runtime.pods import ExportPlan
from detserve.runtime.progress import step

from detserve.export.pipeline import ExportError, ExportRequest

#: fp16 may move mAP50-95 by at most this much (0.5 mAP point).
FP16_MAP_TOLERANCE = 0.005


def build_package(program_path: Path, out_dir: Path, *, device: str, precision: str, max_batch: int, imgsz: int) -> Path:
    """Compile ``program_path`` for ``device``; returns the package path (named by target and torch)."""
    import torch

    target = compiled_lookup.current_target(device)
    if target is None:
        raise CompiledUnavailable(f"building a compiled package for {device} needs that CUDA GPU, and none is visible")
    cuda = device != "cpu"
    dtype = torch.float16 if precision == "fp16" else torch.float32
    module = torch.export.load(str(program_path)).module().to(device=device, dtype=dtype)
    example = torch.rand(2, 3, imgsz, imgsz, device=device, dtype=dtype)
    if cuda:
        example = example.contiguous(memory_format=torch.channels_last)
    batch = torch.export.Dim("batch", min=1, max=max(max_batch, 2))
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")
        program = torch.export.export(module, (example,), dynamic_shapes={"x": {0: batch}}, strict=False)
        path = Path(out_dir) / package_filename("model", target, torch.__version__, precision)
        torch._inductor.aoti_compile_and_package(program, package_path=str(path))
    return path


def build_for_manifest(req: ExportRequest, out: Path, manifest: Manifest, plan: ExportPlan, *, device: str = "cuda:0") -> Manifest:
    """The pipeline step: package, parity gate, manifest. Keeps the ONNX export when anything fails."""
    import torch

    from detserve.export.parity import measure
    from detserve.export.reference import parity_images, source_reference
    from detserve.runtime.detector import Detector

    out = Path(out)
    kept = f"the ONNX export in {out} is complete and serves with onnxruntime"
    if manifest.family != "yolo" or manifest.program is None:
        raise ExportError(f"a compiled package is built from the YOLO torch program (model.pt2), which this export lacks ({kept})")
    want = plan.pod.sm if device != "cpu" else "cpu"
    here = compiled_lookup.current_target(device)
    if here is None:
        raise ExportError(
            f"cannot build the compiled package: no CUDA GPU is visible; AOTInductor compiles for the GPU that will run it, "
            f"so run `detserve export --format aoti --pod {plan.pod.name} ...` inside the pod ({kept})"
        )
    if want and here != want:
        raise ExportError(f"cannot build the compiled package for {want} ({plan.pod.name}) on this {here} device: build it inside the pod ({kept})")
    started = time.perf_counter()
    with step(f"Compiling the torch program with AOTInductor ({plan.precision}, {here}; takes minutes)", req.quiet):
        path = build_package(out / manifest.program.file, out, device=device, precision=plan.precision,
                             max_batch=manifest.batch.max, imgsz=int(manifest.input.imgsz or 640))  # fmt: skip
    build_s = time.perf_counter() - started
    new = manifest.model_copy(update={
        "format": "aoti", "artifact": path.name, "artifact_sha256": sha256_file(path), "precision": plan.precision,
        "gpu_arch": None if here == "cpu" else here, "torch_version": torch.__version__.split("+")[0],
        "pending": [p for p in manifest.pending if p.step != "aoti"],
    })  # fmt: skip
    engine = CompiledEngine(path, expected_target=here, expected_torch=new.torch_version, device=device, max_batch=new.batch.max)
    detector = Detector(out, manifest=new, engine=engine)
    conf = req.parity_conf if req.parity_conf is not None else 0.25
    params = detector.params(conf=conf)
    reference = source_reference(out, new, conf=conf, iou=params.iou)
    images = req.parity_images if req.parity_images is not None else parity_images()
    parity = measure(lambda image, p: detector.detect([image], p)[0], reference, images, params,
                     threshold=req.parity_threshold, what=f"compiled {plan.precision}", quiet=req.quiet)  # fmt: skip
    if plan.precision == "fp16":  # boxes move a little in fp16: the gate is mAP, not box identity
        from detserve.training.recipes import evaluate_map
        from detserve.training.synthetic import scenes

        held_out = scenes(24, seed=777)
        as_triples = lambda dets: [(d.boxes, d.scores, d.class_ids) for d in dets]  # noqa: E731
        ours = evaluate_map(lambda ims: as_triples(detector.detect(ims, params)), held_out)["map50_95"]
        theirs = evaluate_map(lambda ims: as_triples([reference(im) for im in ims]), held_out)["map50_95"]
        passed = abs(ours - theirs) <= FP16_MAP_TOLERANCE
        parity = parity.model_copy(update={"passed": passed})
        if not req.quiet:
            from detserve.runtime.progress import console

            console.print(f"compiled fp16 mAP50-95 {ours:.4f} vs source {theirs:.4f} (gate: within {FP16_MAP_TOLERANCE})")
    new = new.model_copy(update={"parity": parity})
    write_manifest(out, new)
    if not parity.passed:
        raise ExportError(
            f"compiled package parity check failed ({plan.precision}, built in {build_s:.0f} s): figures kept in "
            f"{out / MANIFEST_NAME}; rebuild with --precision fp32 or check the figures"
        )
    return new
