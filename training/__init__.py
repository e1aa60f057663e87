"""Training and evaluation (``detserve.training``): not needed to serve.

``synthetic``: the generated-shapes data set (scenes, YOLO layout).
``metrics``: COCO detection metrics (pycocotools), shared by the adapters'
``evaluate``, ``detserve evaluate`` and the recipes. ``recipes``: the default
models' training recipes, Faster R-CNN's fit loop (used by the adapter's
``train``) and mAP evaluation.
``python -m detserve.training`` reproduces the default models.

Imports only the runtime core beneath it.
"""
