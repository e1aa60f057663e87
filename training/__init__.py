"""Training and evaluation (``detserve.training``): not needed to serve.

``synthetic``: the generated-shapes data set (scenes, COCO ground truth, YOLO
layout). ``recipes``: the default models' training recipes, Faster R-CNN's
fit loop (used by the adapter's ``train``) and mAP evaluation.
``python -m detserve.training`` reproduces the default models.

Imports only the runtime core beneath it.
"""
