"""The runtime core (``detserve.runtime``): everything between an export folder and boxes.

decode (``images``) -> preprocess -> engine (``engines``: onnxruntime, TensorRT,
torch) -> postprocess, chained by ``detector.Detector``; the artifact's
contract (``manifest``), the pods (``pods``), the source models' loaders
(``sources``), the batched Faster R-CNN graph (``batched_rcnn``), and the
offline switches (``offline``).

The bottom layer: it imports nothing from ``detserve.training``, ``export``,
``adapters``, ``serve``, ``benchmarks`` or the CLI (``tests/test_layers.py``
keeps it so).
"""
