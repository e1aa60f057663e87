"""The runtime's boxes equal the reference implementations' boxes.

YOLO: Ultralytics' own ``predict``. Faster R-CNN: torchvision's eval forward.
Same count, same classes, coordinates within 0.5 px, scores within 1e-3 at fp32,
on generated scenes, real photos, EXIF-rotated and non-RGB images.
"""

from __future__ import annotations


import numpy as np
import pytest
from PIL import Image

from detserve.runtime.detector import Detector
from detserve.runtime.images import decode
from detserve.export.reference import fasterrcnn_predict, yolo_predict
from tests.conftest import encode


def assert_same(ours, ref, px=0.5, score=1e-3):
    assert len(ours) == len(ref), (len(ours), len(ref))
    o = np.lexsort((ours.boxes[:, 1], ours.boxes[:, 0], ours.class_ids))
    r = np.lexsort((ref.boxes[:, 1], ref.boxes[:, 0], ref.class_ids))
    np.testing.assert_array_equal(ours.class_ids[o], ref.class_ids[r])
    np.testing.assert_allclose(ours.boxes[o], ref.boxes[r], atol=px)
    np.testing.assert_allclose(ours.scores[o], ref.scores[r], atol=score)


def variants(scenes, photos):
    """(name, input for detserve, RGB array as the reference sees it)"""
    out = [(f"scene{i}", s.image, s.image) for i, s in enumerate(scenes)]
    out += [(f"photo{i}", p, p) for i, p in enumerate(photos)]
    rotated = encode(scenes[0].image, "PNG", orientation=6)  # PNG bytes whose EXIF says: turn me
    out.append(("exif", rotated, decode(rotated)))
    gray = np.asarray(Image.fromarray(scenes[1].image).convert("L"))
    out.append(("gray", gray, np.repeat(gray[..., None], 3, axis=2)))
    rgba = np.concatenate([scenes[2].image, np.full(scenes[2].image.shape[:2] + (1,), 128, np.uint8)], axis=2)
    out.append(("rgba", rgba, scenes[2].image))
    return out


@pytest.fixture(scope="module")
def yolo_reference(yolo_export):
    from detserve.runtime.sources import load_yolo

    return load_yolo(yolo_export / "source.pt")


@pytest.mark.parametrize("backend", ["onnxruntime", "torch"])
def test_yolo_runtime_equals_ultralytics_predict(yolo_export, yolo_reference, scenes, photos, backend):
    detector = Detector(yolo_export, backend=backend, device="cpu")
    total = 0
    for conf in (0.25, 0.05):  # below Ultralytics' 0.25 default really lowers the threshold
        params = detector.params(conf=conf)
        for name, data, rgb in variants(scenes, photos):
            [ours] = detector.detect([data], params)
            [ref] = yolo_predict(yolo_reference, [rgb], imgsz=detector.manifest.input.imgsz, conf=conf, iou=params.iou)
            assert_same(ours, ref)
            total += len(ref)
    assert total >= 20


@pytest.mark.parametrize("orientation,turn", [(3, lambda a: a[::-1, ::-1]), (6, lambda a: np.rot90(a, -1)), (8, lambda a: np.rot90(a, 1))])
def test_exif_tagged_bytes_give_the_boxes_of_the_turned_pixels(yolo_export, scenes, orientation, turn):
    """A photo stored sideways with an EXIF tag is detected as displayed, not as stored."""
    detector = Detector(yolo_export, backend="onnxruntime", device="cpu")
    image = scenes[0].image
    [tagged] = detector.detect([encode(image, "PNG", orientation=orientation)])
    [turned] = detector.detect([np.ascontiguousarray(turn(image))])
    [stored] = detector.detect([image])
    assert len(turned) > 0
    assert_same(tagged, turned, px=1e-3, score=1e-6)
    if orientation != 3 or len(stored) != len(turned):
        assert not (len(stored) == len(tagged) and np.allclose(stored.boxes, tagged.boxes))


def test_fasterrcnn_runtime_equals_torchvision_eval(fasterrcnn_export, scenes, photos):
    detector = Detector(fasterrcnn_export, backend="onnxruntime", device="cpu")
    reference = Detector(fasterrcnn_export, backend="torch", device="cpu").engine.model
    total = 0
    for name, data, rgb in variants(scenes, photos):
        [ours] = detector.detect([data], detector.params(conf=0.3))
        [ref] = fasterrcnn_predict(reference, [rgb], conf=0.3)
        assert_same(ours, ref)
        total += len(ref)
    assert total >= 10
