"""Dataloop model adapters: ``YoloAdapter`` (adapters/yolo.py) and ``FasterRCNNAdapter`` (adapters/fasterrcnn.py).

Both are ``dtlpy.BaseModelAdapter`` subclasses over the detserve runtime; the
app manifests for the Dataloop marketplace live in ``adapters/apps/``.
"""

from __future__ import annotations

from pathlib import Path


def adapter_for(folder: str | Path, **configuration):
    """The adapter for an export folder's model family, loaded."""
    from detserve.runtime.manifest import read_manifest

    family = read_manifest(folder).family
    if family == "yolo":
        from detserve.adapters.yolo import YoloAdapter as cls
    else:
        from detserve.adapters.fasterrcnn import FasterRCNNAdapter as cls
    return cls.from_export(folder, **configuration)
