"""Dataloop box annotations as JSON, built without dtlpy: the body of every answer an exported model gives.

A replica that serves an export folder answers with the JSON that
``dl.AnnotationCollection.to_json()["annotations"]`` would write, but never
imports dtlpy (1-4 s and some 200 MB per process, for one dict layout).
``tests/test_adapters.py`` proves the two equal, key order and all, for the
pinned dtlpy; a dtlpy upgrade that changes the format fails that test, not users.
"""

from __future__ import annotations

from detserve.runtime.postprocess import Detections


def box_annotations(det: Detections, labels: dict[int, str], model_name: str, model_id: str | None) -> list[dict]:
    """``to_collection(...).to_json()["annotations"]`` (adapters/base.py), built directly: the same dicts, about 20x cheaper.

    Building ``dl.Box`` and ``dl.Annotation`` objects per box only to serialise
    them cost more than NMS on the serving path.
    """
    out = []
    for (left, top, right, bottom), score, cls in zip(det.boxes.tolist(), det.scores.tolist(), det.class_ids.tolist()):
        out.append({
            "id": None, "url": None, "creator": None,
            "metadata": {
                "user": {"model": {"confidence": float(min(max(score, 0.0), 1.0)), "name": model_name, "model_id": model_id}},
                "system": {"automated": True, "attributes": {}},
            },
            "hash": None, "itemId": None, "item": None,
            "label": labels.get(cls, str(cls)),
            "dataset": None, "createdAt": None, "updatedBy": None, "updatedAt": None,
            "source": "sdk", "datasetId": None, "type": "box",
            "coordinates": [{"x": left, "y": top, "z": 0}, {"x": right, "y": bottom, "z": 0}],
            "attributes": None,
        })  # fmt: skip
    return out
