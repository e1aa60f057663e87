"""The Dataloop adapters, driven through dtlpy's own ``predict_items``, offline.

No platform: model entities and items are built with ``from_json`` (fake ids),
images are dtlpy *link items* whose ref is a local ``file://`` path (dtlpy's
default item download reads those without a connection), and the one upload
``predict_items`` always does is replaced by returning the collection as is.
A guard fails any test that tries to open a non-loopback connection.

The boxes are checked against the source models' own inference
(``export.reference``): Ultralytics ``predict`` for YOLO, torchvision's eval
forward for Faster R-CNN.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageOps

from detserve.adapters.base import DetectionAdapter
from detserve.adapters.fasterrcnn import FasterRCNNAdapter
from detserve.adapters.yolo import YoloAdapter
from detserve.runtime.manifest import MANIFEST_NAME, ManifestError, read_manifest, sha256_file
from detserve.runtime.postprocess import Detections
from detserve.training.synthetic import CLASSES
from detserve.export.reference import fasterrcnn_predict, yolo_predict
from tests.conftest import ROOT, encode

import dtlpy as dl  # noqa: E402  (after adapters.base, which applies the offline environment)

PX, SCORE = 0.5, 1e-3  # agreement with the reference: box corners (pixels), scores


# --- no network ---------------------------------------------------------------

@pytest.fixture(autouse=True)
def _offline(no_network):
    """Every test here fails if it tries to reach a host other than loopback (conftest.no_network)."""
    yield


# --- offline dtlpy entities -----------------------------------------------------


def configuration(**overrides) -> dict:
    """A complete model configuration: dtlpy calls the platform for any key it has to add."""
    config = {
        # dtlpy's AdapterDefaults
        "include_background": False,
        "upload_annotations": True,
        "clean_annotations": False,
        "overwrite_annotations": True,
        "upload_features": False,
        "root_path": None,
        "data_path": None,
        "output_path": None,
        # detserve
        "conf_thres": 0.25,
        "iou_thres": 0.45,
        "max_det": 300,
        "imgsz": None,
        "batch_size": 4,
        "device": "cpu",
        "backend": "onnxruntime",
        "half": False,
        "labels": None,
        "id_to_label_map": None,
        "artifact": None,
        "weights_filename": None,
    }
    config.update(overrides)
    return config


def model_entity(name: str, **config) -> dl.Model:
    return dl.Model.from_json(
        {
            "id": f"model-id-{name}",
            "name": name,
            "context": {"project": "project-id-offline"},
            "datasetId": "dataset-id-offline",
            "configuration": configuration(**config),
            "inputType": "image",
            "outputType": "box",
            "artifacts": [],  # nothing to download: load_from_model goes straight to load(local_path)
            "status": "deployed",
        },
        client_api=dl.client_api,
    )


def link_item(path: Path, item_id: str | None = None) -> dl.Item:
    """A dtlpy link item pointing at a local file (``file://``): downloads without the platform."""
    path = Path(path)
    mimetype = {".png": "image/png", ".jpg": "image/jpeg", ".jpeg": "image/jpeg"}.get(path.suffix.lower(), "image/png")
    return dl.Item.from_json(
        {
            "id": item_id or f"item-id-{path.stem}",
            "name": path.name,
            "filename": f"/{path.name}",
            "type": "file",
            "datasetId": "dataset-id-offline",
            "projectId": "project-id-offline",
            "metadata": {
                "system": {
                    "mimetype": mimetype,
                    "shebang": {"dltype": "link", "linkInfo": {"type": "url", "ref": path.resolve().as_uri()}},
                }
            },
        },
        client_api=dl.client_api,
    )


class _NoUpload:
    """``predict_items`` always uploads the predictions; offline they come back unchanged."""

    def _upload_model_annotations(self, item, predictions):
        return predictions


class OfflineYolo(_NoUpload, YoloAdapter):
    pass


class OfflineFasterRCNN(_NoUpload, FasterRCNNAdapter):
    pass


def served(cls: type[DetectionAdapter], folder: Path, name: str = "shapes", **config) -> DetectionAdapter:
    """An adapter loaded the way the platform does it: ``load_from_model(model, local_path)``."""
    adapter = cls()
    adapter.load_from_model(model_entity=model_entity(name, **config), local_path=str(folder))
    return adapter


def predict_items(adapter: DetectionAdapter, items: list[dl.Item], batch_size: int) -> dict[str, list[dict]]:
    """dtlpy's ``predict_items``; the annotations' JSON grouped by item id (every item present)."""
    returned, annotations = adapter.predict_items(items, batch_size=batch_size)
    assert returned is items
    by_item: dict[str, list[dict]] = {item.id: [] for item in items}
    for annotation in annotations:
        by_item[annotation.item_id].append(annotation.to_json())
    return by_item


# --- comparing with the reference ------------------------------------------------


def boxes_of(annotations: list[dict]) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """(xyxy boxes, scores, labels) from box annotations' JSON."""
    boxes, scores, labels = [], [], []
    for a in annotations:
        assert a["type"] == "box", a["type"]
        (p1, p2) = a["coordinates"]
        boxes.append((p1["x"], p1["y"], p2["x"], p2["y"]))
        scores.append(a["metadata"]["user"]["model"]["confidence"])
        labels.append(a["label"])
    return np.asarray(boxes, np.float64).reshape(-1, 4), np.asarray(scores, np.float64), labels


def assert_same_boxes(annotations: list[dict], ref: Detections, names: dict[int, str]) -> None:
    """Same count, same labels, corners within PX, scores within SCORE (order-free)."""
    boxes, scores, labels = boxes_of(annotations)
    ref_labels = [names[int(c)] for c in ref.class_ids]
    assert len(annotations) == len(ref), (len(annotations), len(ref))
    if not len(ref):
        return
    label_index = {name: i for i, name in enumerate(sorted(set(labels) | set(ref_labels)))}
    o = np.lexsort((boxes[:, 1], boxes[:, 0], [label_index[x] for x in labels]))
    r = np.lexsort((ref.boxes[:, 1], ref.boxes[:, 0], [label_index[x] for x in ref_labels]))
    assert [labels[i] for i in o] == [ref_labels[i] for i in r]
    np.testing.assert_allclose(boxes[o], ref.boxes[r], atol=PX)
    np.testing.assert_allclose(scores[o], ref.scores[r], atol=SCORE)


def assert_model_info(annotations: list[dict], model: dl.Model, labels: set[str]) -> None:
    for a in annotations:
        info = a["metadata"]["user"]["model"]
        assert info["name"] == model.name and info["model_id"] == model.id
        assert 0.0 <= info["confidence"] <= 1.0
        assert a["label"] in labels


def as_displayed(path: Path) -> np.ndarray:
    """The RGB pixels a viewer shows for a file (EXIF applied by PIL, not by detserve)."""
    with Image.open(path) as im:
        return np.asarray(ImageOps.exif_transpose(im).convert("RGB"))


# --- fixtures ------------------------------------------------------------------


@pytest.fixture(scope="module")
def image_files(tmp_path_factory, scenes) -> list[tuple[Path, np.ndarray]]:
    """Scenes written as PNG and JPEG files, plus one EXIF-rotated JPEG; with what a viewer sees."""
    folder = tmp_path_factory.mktemp("items")
    files = []
    for i, scene in enumerate(scenes[:4]):
        fmt, suffix = ("PNG", ".png") if i % 2 == 0 else ("JPEG", ".jpg")
        path = folder / f"scene{i}{suffix}"
        path.write_bytes(encode(scene.image, fmt, **({"quality": 92} if fmt == "JPEG" else {})))
        files.append(path)
    rotated = folder / "rotated.jpg"
    rotated.write_bytes(encode(scenes[4].image, "JPEG", quality=92, orientation=6))
    files.append(rotated)
    out = [(path, as_displayed(path)) for path in files]
    h, w = scenes[4].image.shape[:2]
    assert out[-1][1].shape[:2] == (w, h)  # the rotation is real
    return out


@pytest.fixture(scope="module")
def yolo_source(yolo_export):
    from detserve.runtime.sources import load_yolo

    return load_yolo(ROOT / "models" / "yolo-shapes.pt")


@pytest.fixture(scope="module")
def fasterrcnn_source(fasterrcnn_export):
    """torchvision's model built from the raw .pth (not from the export)."""
    from detserve.runtime.sources import build_fasterrcnn, read_fasterrcnn_checkpoint

    m = read_manifest(fasterrcnn_export)
    ckpt = read_fasterrcnn_checkpoint(ROOT / "models" / "fasterrcnn-shapes.pth", None)
    return build_fasterrcnn(
        ckpt.arch, ckpt.num_classes, state_dict=ckpt.state_dict, min_size=m.input.min_size, max_size=m.input.max_size
    )


@pytest.fixture(scope="module")
def yolo_adapter(yolo_export):
    return served(OfflineYolo, yolo_export, "yolo-shapes")


@pytest.fixture(scope="module")
def test_images(scenes, photos) -> list[np.ndarray]:
    return [s.image for s in scenes] + list(photos)


YOLO_NAMES = dict(enumerate(CLASSES))  # Ultralytics: class ids 0..K-1
FASTERRCNN_NAMES = {i + 1: name for i, name in enumerate(CLASSES)}  # torchvision: 0 is background
FASTERRCNN_CONF = 0.15  # the default Faster R-CNN scores low: a threshold that still leaves boxes to compare


# --- 1, 2: predict_items equals the reference ------------------------------------


def test_yolo_predict_items_equals_ultralytics(yolo_export, yolo_source, image_files):
    adapter = served(OfflineYolo, yolo_export, "yolo-shapes", conf_thres=0.25, iou_thres=0.45)
    model = adapter.model_entity
    items = [link_item(path) for path, _ in image_files]
    by_item = predict_items(adapter, items, batch_size=3)  # 5 items: batches of 3 and 2
    imgsz = adapter.detector.manifest.input.imgsz
    total = 0
    for item, (path, displayed) in zip(items, image_files):
        [ref] = yolo_predict(yolo_source, [displayed], imgsz=imgsz, conf=0.25, iou=0.45)
        assert_same_boxes(by_item[item.id], ref, YOLO_NAMES)
        assert_model_info(by_item[item.id], model, set(CLASSES))
        total += len(ref)
    assert len(by_item[items[-1].id]) > 0  # the EXIF-rotated image has boxes to compare
    assert total >= 5


def test_fasterrcnn_predict_items_equals_torchvision(fasterrcnn_export, fasterrcnn_source, image_files):
    adapter = served(OfflineFasterRCNN, fasterrcnn_export, "fasterrcnn-shapes", conf_thres=FASTERRCNN_CONF)
    model = adapter.model_entity
    assert adapter.labels == FASTERRCNN_NAMES
    items = [link_item(path) for path, _ in image_files]
    by_item = predict_items(adapter, items, batch_size=4)
    total = 0
    for item, (path, displayed) in zip(items, image_files):
        [ref] = fasterrcnn_predict(fasterrcnn_source, [displayed], conf=FASTERRCNN_CONF)
        assert_same_boxes(by_item[item.id], ref, FASTERRCNN_NAMES)
        assert_model_info(by_item[item.id], model, set(CLASSES))
        total += len(ref)
    assert total >= 5


# --- 3: a bad item does not sink the batch ---------------------------------------


def test_unreadable_items_get_no_boxes_and_the_batch_goes_on(yolo_adapter, image_files, tmp_path):
    corrupt = tmp_path / "corrupt.png"
    corrupt.write_bytes(b"\x89PNG\r\n\x1a\n this is not an image")
    missing = tmp_path / "missing.png"  # never written: the link points nowhere
    good = [link_item(path) for path, _ in image_files[:2]]
    items = [good[0], link_item(missing), link_item(corrupt), good[1]]

    prepared = [yolo_adapter.prepare_item_func(item) for item in items]
    assert prepared[1] is None and prepared[2] is None
    assert all(isinstance(p, np.ndarray) and p.ndim == 3 for p in (prepared[0], prepared[3]))

    collections = yolo_adapter.predict(prepared)
    assert len(collections) == 4
    assert all(isinstance(c, dl.AnnotationCollection) for c in collections)
    assert len(collections[1]) == 0 and len(collections[2]) == 0
    assert len(collections[0]) > 0 and len(collections[3]) > 0

    by_item = predict_items(yolo_adapter, items, batch_size=4)  # one batch holding all four
    assert by_item[items[1].id] == [] and by_item[items[2].id] == []
    assert len(by_item[items[0].id]) == len(collections[0])
    assert len(by_item[items[3].id]) == len(collections[3])


# --- 4: configuration ------------------------------------------------------------


def test_conf_thres_below_the_default_really_lowers_it(yolo_export, yolo_source, test_images):
    default = served(OfflineYolo, yolo_export, conf_thres=0.25)
    low = served(OfflineYolo, yolo_export, conf_thres=0.05)
    at_default, at_low = default.predict(test_images), low.predict(test_images)
    assert sum(map(len, at_low)) > sum(map(len, at_default))
    imgsz = low.detector.manifest.input.imgsz
    refs = yolo_predict(yolo_source, test_images, imgsz=imgsz, conf=0.05, iou=0.45)
    for collection, ref in zip(at_low, refs):
        assert_same_boxes(collection.to_json()["annotations"], ref, YOLO_NAMES)
    assert min(float(ref.scores.min()) for ref in refs if len(ref)) < 0.25  # boxes the default drops


def test_max_det_keeps_the_best_boxes(yolo_export, yolo_source, test_images):
    adapter = served(OfflineYolo, yolo_export, conf_thres=0.05, max_det=2)
    imgsz = adapter.detector.manifest.input.imgsz
    unlimited = yolo_predict(yolo_source, test_images, imgsz=imgsz, conf=0.05, iou=0.45)
    assert max(map(len, unlimited)) > 2  # max_det has something to cut
    refs = yolo_predict(yolo_source, test_images, imgsz=imgsz, conf=0.05, iou=0.45, max_det=2)
    for collection, ref in zip(adapter.predict(test_images), refs):
        assert len(collection) <= 2
        assert_same_boxes(collection.to_json()["annotations"], ref, YOLO_NAMES)


def _labels(collections) -> list[list[str]]:
    return [[a.label for a in c] for c in collections]


def test_id_to_label_map_and_labels_rename_the_classes(yolo_export, yolo_adapter, test_images):
    names = _labels(yolo_adapter.predict(test_images))
    assert sum(map(len, names)) > 0
    to_id = {name: i for i, name in enumerate(CLASSES)}

    mapping = {"0": "disc", "1": "box", "2": "tri", "3": "asterisk"}  # JSON keys are strings
    mapped = served(OfflineYolo, yolo_export, id_to_label_map=mapping)
    assert _labels(mapped.predict(test_images)) == [[mapping[str(to_id[n])] for n in row] for row in names]

    upper = ["CIRCLE", "SQUARE", "TRIANGLE", "STAR"]
    relabelled = served(OfflineYolo, yolo_export, labels=upper)
    assert _labels(relabelled.predict(test_images)) == [[upper[to_id[n]] for n in row] for row in names]

    both = served(OfflineYolo, yolo_export, labels=upper, id_to_label_map=mapping)
    assert both.labels == {0: "disc", 1: "box", 2: "tri", 3: "asterisk"}  # the map is authoritative


def test_null_configuration_values_mean_the_defaults(yolo_export, yolo_adapter, test_images):
    """A key set to null (JSON) on the platform behaves as if it were absent."""
    nulls = served(OfflineYolo, yolo_export, conf_thres=None, iou_thres=None, max_det=None, backend=None, device=None)
    assert nulls.detector.engine.name == yolo_adapter.detector.engine.name
    for ours, theirs in zip(nulls.predict(test_images), yolo_adapter.predict(test_images)):
        assert_same_boxes(ours.to_json()["annotations"], _as_detections(theirs), YOLO_NAMES)


def test_labels_of_the_wrong_length_are_refused(yolo_export):
    with pytest.raises(ValueError, match=r"'labels' has 2 names but the model has 4 classes"):
        served(OfflineYolo, yolo_export, labels=["circle", "square"])


def test_fasterrcnn_labels_map_from_torchvision_ids(fasterrcnn_export, scenes):
    images = [s.image for s in scenes[:4]]
    default = served(OfflineFasterRCNN, fasterrcnn_export, conf_thres=FASTERRCNN_CONF)
    upper = ["CIRCLE", "SQUARE", "TRIANGLE", "STAR"]
    relabelled = served(OfflineFasterRCNN, fasterrcnn_export, conf_thres=FASTERRCNN_CONF, labels=upper)
    assert relabelled.labels == {1: "CIRCLE", 2: "SQUARE", 3: "TRIANGLE", 4: "STAR"}
    names = _labels(default.predict(images))
    assert sum(map(len, names)) > 0
    assert _labels(relabelled.predict(images)) == [[n.upper() for n in row] for row in names]


# --- 5: raw weights are exported on load -------------------------------------------


@pytest.mark.slow  # 4 s: an export; test_lifecycle.py's load_from_model exports raw YOLO weights in make test
def test_raw_weights_are_exported_on_load_and_served(yolo_export, yolo_adapter, scenes, tmp_path):
    artifacts = tmp_path / "artifacts"
    artifacts.mkdir()
    weights = artifacts / "best.pt"
    shutil.copyfile(ROOT / "models" / "yolo-shapes.pt", weights)

    adapter = served(OfflineYolo, artifacts, "raw-yolo", weights_filename="best.pt")
    export = artifacts / "detserve"
    m = read_manifest(export)
    assert adapter.detector.folder == export and m.family == "yolo"
    assert m.source.sha256 == sha256_file(weights)
    assert m.artifact_sha256 == sha256_file(export / m.artifact)
    assert m.parity is not None and m.parity.passed
    assert adapter.model_entity.configuration["artifact"] == "detserve"
    assert adapter.model_entity.configuration["weights_filename"] == "best.pt"

    images = [s.image for s in scenes[:3]]
    for ours, theirs in zip(adapter.predict(images), yolo_adapter.predict(images)):
        assert_same_boxes(ours.to_json()["annotations"], _as_detections(theirs), YOLO_NAMES)

    # Loaded again with the updated configuration: the export is found, not redone.
    stamp = (export / MANIFEST_NAME).stat().st_mtime_ns
    again = served(OfflineYolo, artifacts, "raw-yolo", **adapter.model_entity.configuration)
    assert again.detector.folder == export
    assert (export / MANIFEST_NAME).stat().st_mtime_ns == stamp


def _as_detections(collection: dl.AnnotationCollection) -> Detections:
    boxes, scores, labels = boxes_of(collection.to_json()["annotations"])
    to_id = {name: i for i, name in enumerate(CLASSES)}
    return Detections(boxes.astype(np.float32), scores.astype(np.float32), np.asarray([to_id[n] for n in labels], np.int64))


@pytest.mark.parametrize("weights_filename", [None, "absent.pt"])
def test_a_folder_without_export_or_weights_is_refused(tmp_path, weights_filename):
    (tmp_path / "readme.txt").write_text("not a model")
    with pytest.raises(ManifestError, match="detserve export"):
        served(OfflineYolo, tmp_path, weights_filename=weights_filename)


def test_an_export_of_the_other_family_is_refused(fasterrcnn_export):
    with pytest.raises(ManifestError, match="holds a fasterrcnn model; OfflineYolo serves yolo"):
        served(OfflineYolo, fasterrcnn_export)


# --- 6: dtlpy's download layout -> YOLO dataset --------------------------------------


def _box_json(label: str, left: float, top: float, right: float, bottom: float) -> dict:
    return dl.Annotation.new(annotation_definition=dl.Box(left=left, top=top, right=right, bottom=bottom, label=label)).to_json()


def _gray(w: int, h: int) -> np.ndarray:
    return np.full((h, w, 3), 127, np.uint8)


def _write_dtlpy_item(data_path: Path, subset: str, rel: str, image: np.ndarray, annotations: list[dict] | None) -> None:
    """One item as dtlpy's prepare_data lays it out: <subset>/items/<rel> and <subset>/json/<rel>.json."""
    path = data_path / subset / "items" / rel
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(image).save(path)
    if annotations is not None:
        js = (data_path / subset / "json" / rel).with_suffix(".json")
        js.parent.mkdir(parents=True, exist_ok=True)
        js.write_text(json.dumps({"id": f"id-{rel}", "filename": f"/{rel}", "annotations": annotations}))


def _label_file(root: Path, subset: str, stem: str) -> list[str]:
    [path] = (root / "labels" / subset).glob(f"*_{stem}.txt")
    return path.read_text().splitlines()


def test_convert_from_dtlpy_writes_yolo_labels(tmp_path):
    import yaml

    adapter = YoloAdapter()
    adapter.labels = dict(YOLO_NAMES)  # what load() sets from the manifest

    point = dl.Annotation.new(annotation_definition=dl.Point(x=5, y=5, label="circle")).to_json()
    _write_dtlpy_item(
        tmp_path, "train", "a.png", _gray(100, 50),
        [
            _box_json("circle", 10, 5, 30, 25),
            _box_json("star", 50, 0, 100, 50),
            point,  # not a box: ignored
            _box_json("hexagon", 0, 0, 10, 10),  # not one of the model's labels: skipped
        ],
    )  # fmt: skip
    _write_dtlpy_item(tmp_path, "train", "background.png", _gray(64, 64), None)  # no JSON: an image with no boxes
    _write_dtlpy_item(tmp_path, "validation", "sub/b.jpg", _gray(200, 100), [_box_json("triangle", 20, 10, 60, 90)])

    data_yaml = adapter.convert_from_dtlpy(tmp_path)
    root = tmp_path / "yolo"
    assert data_yaml == root / "data.yaml"

    assert _label_file(root, "train", "a") == [
        "0 0.200000 0.300000 0.200000 0.400000",  # circle: cx 20/100, cy 15/50, w 20/100, h 20/50
        "3 0.750000 0.500000 0.500000 1.000000",  # star
    ]
    assert _label_file(root, "train", "background") == []
    assert _label_file(root, "validation", "b") == ["2 0.200000 0.500000 0.200000 0.800000"]
    assert len(list((root / "images" / "train").iterdir())) == 2
    assert [p.suffix for p in (root / "images" / "validation").iterdir()] == [".jpg"]

    data = yaml.safe_load(data_yaml.read_text())
    assert data["names"] == {0: "circle", 1: "square", 2: "triangle", 3: "star"}
    assert (Path(data["path"]) / data["train"]).is_dir() and (Path(data["path"]) / data["val"]).is_dir()


@pytest.mark.slow
def test_yolo_train_and_save_give_a_servable_export(yolo_export, scenes, tmp_path):
    data_path = tmp_path / "data"
    for subset, chosen in (("train", scenes[:4]), ("validation", scenes[4:6])):
        for i, scene in enumerate(chosen):
            boxes = [_box_json(CLASSES[c], *b) for b, c in zip(scene.boxes.tolist(), scene.classes.tolist())]
            _write_dtlpy_item(data_path, subset, f"{subset}{i}.png", scene.image, boxes)

    adapter = served(OfflineYolo, yolo_export, "yolo-train", epochs=1, imgsz=64, train_batch_size=4)
    weights = adapter.train(data_path, tmp_path / "runs")
    assert Path(weights).is_file()
    adapter.save(tmp_path / "saved")
    m = read_manifest(tmp_path / "saved" / "detserve")
    assert m.family == "yolo" and m.input.imgsz == 64
    assert m.source.sha256 == sha256_file(tmp_path / "saved" / "weights.pt")
    served(OfflineYolo, tmp_path / "saved", "yolo-trained", artifact="detserve").predict([scenes[0].image])


@pytest.mark.slow
def test_fasterrcnn_train_and_save_give_a_servable_export(fasterrcnn_export, scenes, tmp_path):
    data_path = tmp_path / "data"
    for i, scene in enumerate(scenes[:2]):
        boxes = [_box_json(CLASSES[c], *b) for b, c in zip(scene.boxes.tolist(), scene.classes.tolist())]
        _write_dtlpy_item(data_path, "train", f"train{i}.png", scene.image, boxes)

    adapter = served(OfflineFasterRCNN, fasterrcnn_export, "frcnn-train", epochs=1, train_batch_size=2)
    weights = adapter.train(data_path, tmp_path / "runs")
    assert Path(weights).is_file()
    adapter.save(tmp_path / "saved")
    m = read_manifest(tmp_path / "saved" / "detserve")
    assert m.family == "fasterrcnn" and m.labels == {1: "circle", 2: "square", 3: "triangle", 4: "star"}
    assert m.source.sha256 == sha256_file(tmp_path / "saved" / "weights.pth")
    assert m.source.sha256 != read_manifest(fasterrcnn_export).source.sha256  # the weights really changed
    served(OfflineFasterRCNN, tmp_path / "saved", "frcnn-trained", artifact="detserve").predict([scenes[0].image])


@pytest.mark.parametrize("n,model_id", [(0, None), (1, None), (37, "m-123")])
def test_box_annotations_equal_dtlpys_own_to_json(n, model_id):
    """The serving path's direct JSON is what dtlpy would write, key order included (byte-for-byte once dumped)."""
    from detserve.adapters.base import to_collection
    from detserve.adapters.box_json import box_annotations
    from detserve.runtime.postprocess import Detections

    rng = np.random.default_rng(n)
    boxes = rng.uniform(0, 900, (n, 4)).astype(np.float32)
    boxes[:, 2:] += boxes[:, :2]
    scores = rng.uniform(-0.1, 1.1, n).astype(np.float32)  # clipped to [0, 1] on both paths
    det = Detections(boxes=boxes, scores=scores, class_ids=rng.integers(0, 5, n))
    labels = {0: "circle", 1: "square", 2: "triangle"}  # 3 and 4 have no name: their number is the label
    ours = box_annotations(det, labels, "yolo-shapes", model_id)
    theirs = to_collection(det, labels, "yolo-shapes", model_id).to_json()["annotations"]
    assert json.dumps(ours) == json.dumps(theirs)
