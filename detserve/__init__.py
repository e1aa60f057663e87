"""detserve: batched inference for object-detection models.

The runtime core: load an export folder (artifact + manifest) and turn images
into boxes with any engine::

    from detserve import Detector
    detector = Detector("artifacts/yolo")          # onnxruntime on CPU, or the best this machine has
    [dets] = detector.detect(["bus.jpg"], conf=0.25)
    dets.boxes, dets.scores, dets.class_ids          # xyxy pixels of the original image
"""

from __future__ import annotations

__version__ = "0.1.0"

__all__ = ["Detector", "DetectParams", "Detections", "__version__"]


def __getattr__(name: str):
    # Lazy: importing detserve must not pull torch or onnxruntime in.
    if name == "Detector":
        from detserve.detector import Detector

        return Detector
    if name in ("DetectParams", "Detections"):
        from detserve import postprocess

        return getattr(postprocess, name)
    raise AttributeError(name)
