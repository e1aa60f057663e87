"""The source models' own inference, as users run it today: the reference for parity.

YOLO: Ultralytics' ``predict`` (its letterbox, its NMS). Faster R-CNN:
torchvision's eval forward, one image at a time. Both return
:class:`~detserve.runtime.postprocess.Detections` with the manifest's class ids.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import numpy as np
import torch

from detserve.runtime.manifest import Manifest

from detserve.runtime.images import decode
from detserve.runtime.postprocess import Detections


def yolo_predict(
    model, images: list[np.ndarray], *, imgsz: int, conf: float, iou: float, max_det: int = 300, rect: bool = True
) -> list[Detections]:
    """Ultralytics ``YOLO.predict`` on RGB arrays (it takes numpy as BGR, so flip).

    ``rect=True`` is predict's own default (each image letterboxed to its minimal
    stride rectangle); ``rect=False`` makes Ultralytics' predictor letterbox to the
    full square (``LetterBox(auto=False)``), as it does for ONNX/TensorRT models:
    the reference for GPU-pod exports.
    """
    out = []
    for image in images:
        result = model.predict(
            image[..., ::-1].copy(), imgsz=imgsz, conf=conf, iou=iou, max_det=max_det, rect=rect, verbose=False, device="cpu"
        )[0]
        b = result.boxes
        out.append(Detections(b.xyxy.numpy().astype(np.float32), b.conf.numpy().astype(np.float32), b.cls.numpy().astype(np.int64)))
    return out


@torch.inference_mode()
def fasterrcnn_predict(model: torch.nn.Module, images: list[np.ndarray], *, conf: float = 0.0) -> list[Detections]:
    """torchvision's eval forward, image by image, on 0-1 float RGB tensors."""
    out = []
    for image in images:
        x = torch.from_numpy(np.ascontiguousarray(image.transpose(2, 0, 1))).float() / 255.0
        r = model([x])[0]
        keep = r["scores"] > conf
        out.append(Detections(r["boxes"][keep].numpy(), r["scores"][keep].numpy(), r["labels"][keep].numpy().astype(np.int64)))
    return out


def photos() -> list[np.ndarray]:
    """The two photos Ultralytics ships (bus.jpg, zidane.jpg): real images with no download."""
    import ultralytics

    assets = Path(ultralytics.__file__).parent / "assets"
    return [decode(assets / name) for name in ("bus.jpg", "zidane.jpg")]


def parity_images(n_generated: int = 6, seed: int = 1234) -> list[np.ndarray]:
    """Photos plus generated scenes of varied sizes, for export-time parity checks."""
    from detserve.training.synthetic import scenes

    return photos() + [s.image for s in scenes(n_generated, seed)]


def source_reference(out: Path, manifest: Manifest, *, conf: float, iou: float) -> Callable[[np.ndarray], Detections]:
    """The source library's own inference on CPU for an export folder: image -> detections."""
    if manifest.family == "yolo":
        from detserve.runtime.sources import load_yolo

        model = load_yolo(Path(out) / manifest.source.file)
        rect = manifest.input.rect
        return lambda image: yolo_predict(model, [image], imgsz=manifest.input.imgsz, conf=conf, iou=iou, rect=rect)[0]
    from detserve.runtime.engines.torch import TorchEngine

    model = TorchEngine(Path(out), manifest, device="cpu").model
    return lambda image: fasterrcnn_predict(model, [image], conf=conf)[0]
