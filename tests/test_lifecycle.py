"""The five wrapper flows of a Dataloop model adapter, end to end, offline, on the shipped default models.

dtlpy's own ``load_from_model``, ``save_to_model``, ``predict_items``,
``train_model`` and ``evaluate_model`` run unchanged; only the platform's side
of the download/upload boundary is replaced (tests/fake_dataloop.py). Items are
generated scenes stored as link items with ``file://`` refs, in a dataset with
``train`` and ``validation`` subsets; the models are configured exactly as
adapters/apps/*/dataloop.json ships them (the CPU pod).

The metrics are checked against pycocotools run here, on COCO dicts this test
builds itself from the scenes' ground truth and the predictions the platform
received; a hand-computed case pins the reference.
"""

from __future__ import annotations

import contextlib
import io
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from detserve.adapters.base import METRIC_FIGURES, PER_LABEL_FIGURE, DetectionAdapter
from detserve.adapters.dtlpy_data import read_subset
from detserve.adapters.fasterrcnn import FasterRCNNAdapter
from detserve.adapters.yolo import YoloAdapter
from detserve.runtime.detector import Detector
from detserve.runtime.manifest import read_manifest, sha256_file
from detserve.training.metrics import STAT_NAMES, ImageBoxes, coco_metrics
from detserve.training.synthetic import CLASSES, scenes as make_scenes
from tests.conftest import ROOT
from tests.fake_dataloop import FakePlatform

import dtlpy as dl  # noqa: E402  (after detserve.adapters, which applies the offline environment)

ADAPTERS = {"yolo": YoloAdapter, "fasterrcnn": FasterRCNNAdapter}
WEIGHTS = {"yolo": ROOT / "models" / "yolo-shapes.pt", "fasterrcnn": ROOT / "models" / "fasterrcnn-shapes.pth"}
N_TRAIN, N_VAL = 4, 4


def shipped(family: str) -> tuple[str, dict]:
    """(name, configuration) of the CPU-pod model in the family's dataloop.json."""
    manifest = json.loads((ROOT / "adapters" / "apps" / family / "dataloop.json").read_text())
    [model] = [m for m in manifest["components"]["models"] if m["name"].endswith("regular-m")]
    return model["name"], model["configuration"]


@pytest.fixture(scope="module")
def dataset_scenes():
    return make_scenes(N_TRAIN + N_VAL, seed=77)


@pytest.fixture
def platform(tmp_path, monkeypatch, dataset_scenes) -> FakePlatform:
    from dtlpy.services import service_defaults

    monkeypatch.setattr(service_defaults, "DATALOOP_PATH", str(tmp_path / "dataloop"))
    monkeypatch.chdir(tmp_path)  # train_model writes tmp/<model id> under the working directory
    fake = FakePlatform(tmp_path / "platform")
    (tmp_path / "files").mkdir()
    for i, scene in enumerate(dataset_scenes):
        subset = "train" if i < N_TRAIN else "validation"
        path = tmp_path / "files" / f"scene{i}.png"
        Image.fromarray(scene.image).save(path)
        fake.add_item(path, subset, [(*b, CLASSES[c]) for b, c in zip(scene.boxes.tolist(), scene.classes.tolist())])
    fake.install(monkeypatch)
    yield fake
    assert not fake.unexpected, f"dtlpy called the platform: {fake.unexpected}"


def model_with_export(platform: FakePlatform, family: str, export: Path, **overrides) -> dl.Model:
    """A model whose artifacts (the bucket) hold a detserve export in ``detserve/``, as the manifests expect."""
    name, configuration = shipped(family)
    model = platform.model(name, configuration | overrides, list(CLASSES))
    shutil.copytree(export, platform.bucket(model.id) / "detserve")
    return model


def detections_json(collection_or_annotations) -> list[tuple]:
    annotations = collection_or_annotations
    return sorted(
        (a["label"], *[round(c[k], 3) for c in a["coordinates"] for k in ("x", "y")], round(a["metadata"]["user"]["model"]["confidence"], 4))
        for a in annotations
    )


def direct(folder: Path, images: list[np.ndarray], conf: float, labels: dict[int, str]) -> list[list[tuple]]:
    """The same export run by detserve's runtime directly, as sorted (label, x1, y1, x2, y2, score)."""
    detector = Detector(folder, backend="onnxruntime", device="cpu")
    out = []
    for det in detector.detect(images, detector.params(conf=conf)):
        out.append(sorted(
            (labels[int(c)], *[round(v, 3) for v in b], round(float(min(max(s, 0.0), 1.0)), 4))
            for b, s, c in zip(det.boxes.tolist(), det.scores.tolist(), det.class_ids.tolist())
        ))  # fmt: skip
    return out


# --- 1. load_from_model -----------------------------------------------------------------


@pytest.mark.parametrize("family", ["yolo", "fasterrcnn"])
def test_load_from_model_downloads_the_export_and_serves_it(family, platform, request, dataset_scenes, tmp_path):
    export = request.getfixturevalue(f"{family}_export")
    model = model_with_export(platform, family, export)
    adapter = ADAPTERS[family]()
    adapter.load_from_model(model_entity=model)  # default local path: DATALOOP_PATH/models/<name>

    local = tmp_path / "dataloop" / "models" / model.name
    assert adapter.detector.folder == local / "detserve"
    assert read_manifest(local / "detserve").artifact_sha256 == read_manifest(export).artifact_sha256
    images = [s.image for s in dataset_scenes[:3]]
    conf = adapter.detector.params(conf=model.configuration["conf_thres"]).conf
    ours = [detections_json(c.to_json()["annotations"]) for c in adapter.predict(images)]
    assert ours == direct(export, images, conf, adapter.labels)
    assert sum(map(len, ours)) > 0


@pytest.mark.parametrize("family", ["yolo", pytest.param("fasterrcnn", marks=pytest.mark.slow)])
def test_load_from_model_exports_raw_weights(family, platform, request, dataset_scenes):
    """Artifacts holding only the raw .pt/.pth: load exports them (parity checked) and serves the same boxes."""
    name, configuration = shipped(family)
    model = platform.model(name, configuration, list(CLASSES))
    weights = platform.bucket(model.id) / configuration["weights_filename"]
    shutil.copyfile(WEIGHTS[family], weights)

    adapter = ADAPTERS[family]()
    adapter.load_from_model(model_entity=model)
    m = adapter.detector.manifest
    assert m.source.sha256 == sha256_file(WEIGHTS[family]) and m.parity is not None and m.parity.passed
    reference = request.getfixturevalue(f"{family}_export")
    images = [s.image for s in dataset_scenes[:2]]
    conf = adapter.detector.params(conf=configuration["conf_thres"]).conf
    ours = [detections_json(c.to_json()["annotations"]) for c in adapter.predict(images)]
    theirs = direct(reference, images, conf, adapter.labels)
    assert [len(x) for x in ours] == [len(x) for x in theirs]


# --- 2. save_to_model ----------------------------------------------------------------------


def test_save_to_model_uploads_a_servable_export(platform, yolo_export, dataset_scenes, tmp_path):
    model = model_with_export(platform, "yolo", yolo_export)
    adapter = YoloAdapter()
    adapter.load_from_model(model_entity=model)
    shutil.rmtree(platform.bucket(model.id))  # the upload alone must fill the bucket

    adapter.save_to_model(local_path=str(tmp_path / "save"))
    assert platform.uploads == [["detserve", "weights.pt"]]
    assert model.configuration["artifact"] == "detserve" and model.configuration["weights_filename"] == "weights.pt"

    fresh = YoloAdapter()  # a new pod: only the model entity and its bucket
    entity = platform.model(model.name, model.configuration, list(CLASSES))
    fresh.load_from_model(model_entity=entity, local_path=str(tmp_path / "pod"))
    assert fresh.detector.folder == tmp_path / "pod" / "detserve"
    images = [s.image for s in dataset_scenes[:3]]
    assert [c.to_json()["annotations"] for c in fresh.predict(images)] == [c.to_json()["annotations"] for c in adapter.predict(images)]


# --- 3. predict_items ------------------------------------------------------------------------


def test_predict_items_uploads_the_boxes_of_each_item(platform, yolo_export, dataset_scenes):
    model = model_with_export(platform, "yolo", yolo_export)
    adapter = YoloAdapter()
    adapter.load_from_model(model_entity=model)
    items = [platform.item(i) for i in sorted(platform.items)[:5]]
    returned, annotations = adapter.predict_items(items, batch_size=2)
    assert returned is items
    stored = platform.predictions(model.name)
    conf = adapter.detector.params(conf=model.configuration["conf_thres"]).conf
    expected = direct(yolo_export, [s.image for s in dataset_scenes[:5]], conf, adapter.labels)
    for item, want in zip(items, expected):
        assert detections_json(stored[item.id]) == want
    assert sum(map(len, expected)) == len(annotations) > 0
    for ann in (a for anns in stored.values() for a in anns):
        assert ann["metadata"]["system"]["model"]["name"] == model.name  # what evaluate tells predictions by


# --- 4. train_model ---------------------------------------------------------------------------


def test_prepare_data_layout_keeps_the_boxes_of_link_items(platform, yolo_export, dataset_scenes, tmp_path):
    """dtlpy saves link items as <name>.png.png; read_subset still finds their JSON (it used to read background)."""
    model = model_with_export(platform, "yolo", yolo_export)
    adapter = YoloAdapter()
    adapter.load_from_model(model_entity=model)
    root, data_path, _ = adapter.prepare_data(dataset=platform.dataset, root_path=str(tmp_path / "prep"))
    assert sorted(p.name for p in (Path(data_path) / "train" / "items" / "train").iterdir())[0] == "scene0.png.png"
    samples = read_subset(Path(data_path), "train")
    assert len(samples) == N_TRAIN
    for sample, scene in zip(samples, dataset_scenes):
        assert sample.labels == [CLASSES[c] for c in scene.classes]
        np.testing.assert_array_equal(sample.boxes, scene.boxes)


def _train(platform: FakePlatform, family: str, export: Path, tmp_path: Path, **overrides) -> tuple[dl.Model, DetectionAdapter]:
    model = model_with_export(platform, family, export, **overrides)
    adapter = ADAPTERS[family]()
    trained = adapter.train_model(model)
    assert trained is model and model.status == "trained"
    assert [u["status"] for u in platform.updates][-1] == "trained" and "training" in [u["status"] for u in platform.updates]
    data_path = tmp_path / "tmp" / model.id / "datasets" / platform.dataset.id
    assert sum(len(s.boxes) for s in read_subset(data_path, "train")) > 0  # trained on boxes, not background
    bucket = platform.bucket(model.id)
    weights = bucket / model.configuration["weights_filename"]
    assert weights.is_file() and (bucket / "detserve" / "manifest.json").is_file()
    assert read_manifest(bucket / "detserve").source.sha256 == sha256_file(weights)
    assert sha256_file(weights) != sha256_file(WEIGHTS[family])  # the weights really changed

    served = ADAPTERS[family]()  # the saved artifacts serve with no further step
    served.load_from_model(model_entity=model, local_path=str(tmp_path / "pod"))
    assert served.detector.manifest.source.sha256 == sha256_file(weights)
    assert len(served.predict([np.zeros((64, 64, 3), np.uint8)])) == 1
    return model, served


def test_yolo_train_model_trains_saves_and_serves(platform, yolo_export, tmp_path):
    model, served = _train(platform, "yolo", yolo_export, tmp_path, epochs=1, imgsz=64, train_batch_size=4)
    assert served.detector.manifest.input.imgsz == 64
    yolo_files = list((tmp_path / "tmp" / model.id / "datasets" / platform.dataset.id / "yolo" / "labels" / "train").glob("*.txt"))
    assert len(yolo_files) == N_TRAIN and all(p.read_text().strip() for p in yolo_files)


@pytest.mark.slow
def test_fasterrcnn_train_model_trains_saves_and_serves(platform, fasterrcnn_export, tmp_path):
    _train(platform, "fasterrcnn", fasterrcnn_export, tmp_path, epochs=1, train_batch_size=2)


# --- 5. evaluate_model --------------------------------------------------------------------------


def reference_stats(truth: list[ImageBoxes], predicted: list[dict], labels: list[str]) -> np.ndarray:
    """pycocotools on COCO dicts built here (not by detserve.training.metrics)."""
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    cat = {n: i + 1 for i, n in enumerate(labels)}
    images = [{"id": i + 1} for i in range(len(truth))]
    anns = []
    for i, image in enumerate(truth):
        for (x0, y0, x1, y1), label in zip(image.boxes.tolist(), image.labels):
            anns.append({"id": len(anns) + 1, "image_id": i + 1, "category_id": cat[label],
                         "bbox": [x0, y0, x1 - x0, y1 - y0], "area": (x1 - x0) * (y1 - y0), "iscrowd": 0})  # fmt: skip
    with contextlib.redirect_stdout(io.StringIO()):
        gt = COCO()
        gt.dataset = {"images": images, "annotations": anns, "categories": [{"id": i, "name": n} for n, i in cat.items()]}
        gt.createIndex()
        ev = COCOeval(gt, gt.loadRes(predicted), iouType="bbox")
        ev.evaluate(), ev.accumulate(), ev.summarize()
    return ev.stats


@pytest.mark.parametrize("family", ["yolo", "fasterrcnn"])
def test_evaluate_model_publishes_the_coco_metrics_of_pycocotools(family, platform, request, dataset_scenes):
    export = request.getfixturevalue(f"{family}_export")
    conf = {"yolo": 0.05, "fasterrcnn": 0.15}[family]  # low enough that the PR curve has points (the default models score low)
    model = model_with_export(platform, family, export, conf_thres=conf)
    adapter = ADAPTERS[family]()
    returned_model, returned_dataset = adapter.evaluate_model(model, platform.dataset, filters=dl.Filters(field="dir", values="/validation"))
    assert returned_model is model and returned_dataset is platform.dataset

    val_ids = sorted(i for i, it in platform.items.items() if it["dir"] == "/validation")
    stored = platform.predictions(model.name)
    assert all(not stored[i] for i in stored if i not in val_ids)  # only the filtered items were predicted
    val_scenes = dataset_scenes[N_TRAIN:]
    expected = direct(export, [s.image for s in val_scenes], conf, adapter.labels)
    assert [detections_json(stored[i]) for i in val_ids] == expected  # evaluate_model's predict step really ran

    truth = [ImageBoxes(s.boxes.astype(np.float64), [CLASSES[c] for c in s.classes]) for s in val_scenes]
    predicted = []
    for image_id, item_id in enumerate(val_ids, start=1):
        for a in stored[item_id]:
            (p1, p2) = a["coordinates"]
            predicted.append({"image_id": image_id, "category_id": CLASSES.index(a["label"]) + 1,
                              "bbox": [p1["x"], p1["y"], p2["x"] - p1["x"], p2["y"] - p1["y"]],
                              "score": a["metadata"]["user"]["model"]["confidence"]})  # fmt: skip
    ref = reference_stats(truth, predicted, list(CLASSES))
    ours = adapter.last_metrics
    for name, value in zip(STAT_NAMES, ref):
        assert abs(ours.stats[name] - value) <= 1e-6, (name, ours.stats[name], value)
    assert ours.map50 > 0.3 and ours.images == N_VAL and ours.objects == sum(len(s.boxes) for s in val_scenes)
    print(f"{family}: mAP50-95 {ours.map50_95:.4f} mAP50 {ours.map50:.4f} P {ours.precision:.3f} R {ours.recall:.3f}")

    published = {(m["figure"], m["legend"]): m for m in platform.metrics}
    for figure in METRIC_FIGURES:
        sample = published[(figure, platform.dataset.name)]
        assert sample["modelId"] == model.id and sample["datasetId"] == platform.dataset.id and sample["data"]["x"] == 0
        want = {"precision": ours.precision, "recall": ours.recall}.get(figure, ours.stats.get(figure))
        assert sample["data"]["y"] == pytest.approx(want, abs=1e-12)
    assert published[("mAP50-95", platform.dataset.name)]["data"]["y"] == pytest.approx(ref[0], abs=1e-6)
    for label, ap in ours.per_label_ap.items():
        if ap is not None:
            assert published[(PER_LABEL_FIGURE, label)]["data"]["y"] == pytest.approx(ap)


# --- the metric code itself ------------------------------------------------------------------------


def _boxes(*rows, scores=None):
    return ImageBoxes(np.asarray([r[:4] for r in rows], np.float64).reshape(-1, 4), [r[4] for r in rows],
                      None if scores is None else np.asarray(scores, np.float64))  # fmt: skip


def test_a_hand_computed_case_pins_the_metrics():
    """Image 1: a circle found exactly (0.9) plus a weak false circle (0.3). Image 2: a square missed, a false square (0.8).

    circle: the TP ranks first, so precision is 1 at every recall: AP 1 at every IoU.
    square: its one detection is false: AP 0. mAP = (1 + 0) / 2 = 0.5 at 0.5 and at 0.5:0.95.
    At conf 0.5: the 0.9 circle and the 0.8 square count: precision 1/2, recall 1/2.
    """
    truth = [_boxes((0, 0, 10, 10, "circle")), _boxes((20, 20, 40, 40, "square"))]
    predicted = [
        _boxes((0, 0, 10, 10, "circle"), (30, 0, 40, 10, "circle"), scores=[0.9, 0.3]),
        _boxes((50, 50, 60, 60, "square"), scores=[0.8]),
    ]
    m = coco_metrics(truth, predicted, ["circle", "square", "star"], conf_thres=0.5)
    assert m.map50 == pytest.approx(0.5, abs=1e-9) and m.map50_95 == pytest.approx(0.5, abs=1e-9)
    assert m.per_label_ap == {"circle": pytest.approx(1.0), "square": pytest.approx(0.0), "star": None}
    assert (m.precision, m.recall) == (0.5, 0.5)
    assert (m.images, m.objects, m.predictions) == (2, 2, 3)
    low = coco_metrics(truth, predicted, ["circle", "square", "star"], conf_thres=0.1)
    assert (low.precision, low.recall) == (pytest.approx(1 / 3), 0.5)  # the 0.3 circle now counts as a false positive


def test_half_overlap_is_a_match_at_050_only():
    """A box shifted by a third of its width: IoU = 20*30/(2*30*30 - 20*30) = 0.5 exactly (matched at IoU 0.5 only)."""
    truth = [_boxes((0, 0, 30, 30, "circle"))]
    predicted = [_boxes((10, 0, 40, 30, "circle"), scores=[0.9])]
    m = coco_metrics(truth, predicted, ["circle"])
    assert m.map50 == pytest.approx(1.0) and m.stats["mAP75"] == 0.0
    assert m.map50_95 == pytest.approx(0.1)  # 1 of the 10 IoU thresholds


def test_metrics_equal_pycocotools_on_noisy_predictions(dataset_scenes):
    rng = np.random.default_rng(5)
    truth, predicted, coco_predicted = [], [], []
    for image_id, scene in enumerate(dataset_scenes, start=1):
        truth.append(ImageBoxes(scene.boxes.astype(np.float64), [CLASSES[c] for c in scene.classes]))
        boxes = scene.boxes.astype(np.float64) + rng.normal(0, 4, scene.boxes.shape)
        labels = [CLASSES[c] if rng.random() > 0.2 else CLASSES[(c + 1) % 4] for c in scene.classes]
        scores = rng.uniform(0.05, 1, len(labels))
        predicted.append(ImageBoxes(boxes, labels, scores))
        for b, label, s in zip(boxes.tolist(), labels, scores.tolist()):
            coco_predicted.append({"image_id": image_id, "category_id": CLASSES.index(label) + 1,
                                   "bbox": [b[0], b[1], b[2] - b[0], b[3] - b[1]], "score": s})  # fmt: skip
    ours = coco_metrics(truth, predicted, list(CLASSES), conf_thres=0.5)
    ref = reference_stats(truth, coco_predicted, list(CLASSES))
    assert 0.05 < ref[0] < 0.95  # neither trivial nor zero
    for name, value in zip(STAT_NAMES, ref):
        assert abs(ours.stats[name] - value) <= 1e-6, name


def test_no_predictions_score_zero():
    m = coco_metrics([_boxes((0, 0, 10, 10, "circle"))], [_boxes()], ["circle"], conf_thres=0.5)
    assert (m.map50_95, m.map50, m.precision, m.recall, m.predictions) == (0.0, 0.0, 0.0, 0.0, 0)


# --- the same from the command line ------------------------------------------------------------------


def test_cli_evaluate_scores_the_folder_prepare_data_downloads(platform, yolo_export, dataset_scenes, tmp_path):
    from typer.testing import CliRunner

    from detserve.cli import app

    adapter = YoloAdapter()
    adapter.load_from_model(model_entity=model_with_export(platform, "yolo", yolo_export))
    _, data_path, _ = adapter.prepare_data(dataset=platform.dataset, root_path=str(tmp_path / "prep"))
    out = tmp_path / "metrics.json"
    result = CliRunner().invoke(app, ["evaluate", str(data_path), "--model", str(yolo_export), "--out", str(out),
                                      "--conf", "0.05", "--backend", "onnxruntime", "--device", "cpu"])  # fmt: skip
    assert result.exit_code == 0, result.output
    assert "mAP50-95" in result.output and "AP50-95 circle" in result.output
    report = json.loads(out.read_text())
    assert report["subset"] == "validation" and report["images"] == N_VAL

    val_scenes = dataset_scenes[N_TRAIN:]
    detector = Detector(yolo_export, backend="onnxruntime", device="cpu")
    predicted = []
    for image_id, det in enumerate(detector.detect([s.image for s in val_scenes], detector.params(conf=0.05)), start=1):
        for (x0, y0, x1, y1), score, cls in zip(det.boxes.tolist(), det.scores.tolist(), det.class_ids.tolist()):
            predicted.append({"image_id": image_id, "category_id": int(cls) + 1, "bbox": [x0, y0, x1 - x0, y1 - y0], "score": score})
    truth = [ImageBoxes(s.boxes.astype(np.float64), [CLASSES[c] for c in s.classes]) for s in val_scenes]
    ref = reference_stats(truth, predicted, list(CLASSES))
    for name, value in zip(STAT_NAMES, ref):
        assert abs(report["stats"][name] - value) <= 1e-6, name


@pytest.mark.parametrize("args,message", [
    (["--subset", "test"], "has no subset 'test'"),
    ([], "has no <subset>/items folder"),
])  # fmt: skip
def test_cli_evaluate_user_errors_are_one_red_line(args, message, tmp_path, yolo_export):
    from typer.testing import CliRunner

    from detserve.cli import app

    if args:
        (tmp_path / "train" / "items").mkdir(parents=True)
    result = CliRunner().invoke(app, ["evaluate", str(tmp_path), "--model", str(yolo_export), *args])
    assert result.exit_code == 2
    assert message in result.output and "Traceback" not in result.output
