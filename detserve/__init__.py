"""detserve: batched inference for object-detection models.

One namespace for the whole product; each layer is a subpackage, and data
flows one way, weights -> export -> artifact + manifest -> engine -> adapter
-> serve:

=======================  ===========================================================
``detserve.runtime``     the core: decode, pre/post-processing, engines, manifest
``detserve.training``    generated shapes data set, training recipes, mAP
``detserve.export``      weights -> ONNX / TensorRT, parity, manifest.json
``detserve.adapters``    Dataloop ``BaseModelAdapter`` subclasses
``detserve.serve``       the Ray Serve deployment, local runner, HTTP client
``detserve.benchmarks``  load tests and peers
``detserve.cli``         the ``detserve`` command, on top of them all
=======================  ===========================================================

The runtime core's entry point, re-exported here::

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
        from detserve.runtime.detector import Detector

        return Detector
    if name in ("DetectParams", "Detections"):
        from detserve.runtime import postprocess

        return getattr(postprocess, name)
    raise AttributeError(name)
