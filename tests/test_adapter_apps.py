"""A user's own Dataloop adapter folder, without Ray: the manifest, its Serve settings, the offline entity,
the request item, and the serving contract's stages around the adapter's own code.

The adapters: the Dataloop tutorial's YOLO adapter as the tutorial writes it
(adapters/apps/examples/yolo-tutorial), a torchvision Faster R-CNN adapter in
the style of Dataloop's app (adapters/apps/examples/fasterrcnn), and
deliberately faulty ones (tests/adapters/). tests/test_adapter_serving.py
serves the same folders with Ray Serve.
"""

from __future__ import annotations

import gc
import json
import re
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from detserve.adapters.dataloop_app import GIB, POD_TYPES, AppError, ClusterSize, read_app, replica_plan
from detserve.runtime.images import ImageError, Limits
from tests.conftest import ROOT, encode

EXAMPLES = ROOT / "adapters" / "apps" / "examples"
TUTORIAL, FASTERRCNN = EXAMPLES / "yolo-tutorial", EXAMPLES / "fasterrcnn"
FAULTY, UNIMPORTABLE = ROOT / "tests" / "adapters" / "faulty", ROOT / "tests" / "adapters" / "unimportable"
#: Dataloop's tutorial, in the shared folder beside the checkout (a worktree sits one level deeper); not in CI's clone.
SHARED_TUTORIAL = next((p for p in (ROOT.parent / "shared", ROOT.parent.parent / "shared") if p.is_dir()), ROOT.parent / "shared") / "dataloop" / "tutorial-custom-model-adapter.md"


def solid(rgb: tuple[int, int, int], size: tuple[int, int] = (64, 48)) -> bytes:
    """A PNG of one colour: the faulty adapter picks its fault by the top-left pixel."""
    return encode(np.full((size[1], size[0], 3), rgb, np.uint8))


# ---- the folder and its manifest (no dtlpy) ---------------------------------------------------


def test_the_tutorial_folder_reads_as_the_platform_would():
    app = read_app(TUTORIAL)
    model = app.model()  # its only model
    assert (app.name, model.name, model.class_name) == ("yolo20", "yolo20n", "Adapter")
    assert model.entry_point == TUTORIAL / "model_adapter.py"
    assert model.artifacts == TUTORIAL / "artifacts" and (model.artifacts / model.weights_filename).is_file()
    assert (model.pod_type, model.concurrency) == ("regular-m", 1)
    assert (model.autoscaler.min_replicas, model.autoscaler.max_replicas, model.autoscaler.queue_length) == (1, 2, 100)
    assert model.labels == ["circle", "square", "triangle", "star"]


def test_the_tutorial_adapter_is_the_tutorials_code_unchanged():
    if not SHARED_TUTORIAL.is_file():
        pytest.skip(f"Dataloop's tutorial is not at {SHARED_TUTORIAL} on this machine (it is outside the repository)")
    [code] = re.findall(r"```python\n%%writefile model_adapter.py\n(.*?)```", SHARED_TUTORIAL.read_text(), re.S)
    assert (TUTORIAL / "model_adapter.py").read_text() == code


def test_the_pod_table_is_the_tutorials():
    table = {name: (pod.cpus, pod.memory_gib, pod.gpus) for name, pod in POD_TYPES.items()}
    assert table == {
        "regular-xs": (0.5, 1.7, 0), "regular-s": (1, 3.5, 0), "regular-m": (2, 7, 0), "regular-l": (4, 14, 0),
        "gpu-k80": (4, 26, 1), "gpu-t4": (4, 14, 1), "gpu-v100": (6, 26, 1), "gpu-a100": (12, 85, 1),
    }  # fmt: skip


def test_the_tutorials_regular_m_with_two_replicas_runs_on_two_cores():
    plan = replica_plan(read_app(TUTORIAL).model(), ClusterSize(cpus=2, memory_bytes=8 * GIB))
    assert plan.max_replicas * plan.num_cpus <= 2 and plan.max_replicas * plan.memory_bytes <= 8 * GIB
    assert (plan.max_replicas, plan.num_cpus, plan.initial_replicas, plan.min_replicas) == (2, 1.0, 1, 1)
    assert plan.note and "\n" not in plan.note and "regular-m asks 2 vCPU, 7 GiB" in plan.note and "capped to 2 replica(s) of 1 CPU" in plan.note
    options = plan.deployment_options()
    assert options["ray_actor_options"] == {"num_cpus": 1.0, "memory": plan.memory_bytes}
    assert options["autoscaling_config"]["target_ongoing_requests"] == 100  # queueLength


def test_a_cluster_big_enough_gets_the_pod_as_asked_and_no_line():
    plan = replica_plan(read_app(TUTORIAL).model(), ClusterSize(cpus=64, memory_bytes=512 * GIB, gpus=8))
    assert (plan.num_cpus, plan.memory_bytes, plan.num_gpus, plan.max_replicas) == (2, 7 * GIB, 0, 2)
    assert plan.note is None


def _app(tmp_path: Path, runtime: dict) -> Path:
    manifest = json.loads((FAULTY / "dataloop.json").read_text())
    manifest["components"]["computeConfigs"][0]["runtime"] = runtime
    (tmp_path / "dataloop.json").write_text(json.dumps(manifest))
    (tmp_path / "model_adapter.py").write_text((FAULTY / "model_adapter.py").read_text())
    return tmp_path


def test_a_gpu_pod_on_a_cluster_without_one_asks_for_none_and_says_so(tmp_path):
    app = read_app(_app(tmp_path, {"podType": "gpu-t4", "autoscaler": {"minReplicas": 0, "maxReplicas": 3, "queueLength": 7}}))
    plan = replica_plan(app.model("faulty"), ClusterSize(cpus=16, memory_bytes=64 * GIB, gpus=0))
    assert plan.num_gpus == 0 and "no GPU" in plan.note and "T4" in plan.note
    assert (plan.num_cpus, plan.max_replicas) == (4, 3)
    # minReplicas 0: Serve may scale to zero, but one replica starts, so that load() runs (and fails) at start.
    assert (plan.min_replicas, plan.initial_replicas, plan.target_ongoing_requests) == (0, 1, 7)
    with_gpus = replica_plan(app.model("faulty"), ClusterSize(cpus=16, memory_bytes=64 * GIB, gpus=1))
    assert with_gpus.num_gpus == pytest.approx(1 / 3, abs=1e-3)
    assert with_gpus.deployment_options()["ray_actor_options"]["num_gpus"] == with_gpus.num_gpus


def test_many_small_replicas_on_a_small_machine_get_half_a_core_each(tmp_path):
    app = read_app(_app(tmp_path, {"podType": "regular-xs", "concurrency": 3, "autoscaler": {"minReplicas": 2, "maxReplicas": 10}}))
    plan = replica_plan(app.model("faulty"), ClusterSize(cpus=2, memory_bytes=16 * GIB))
    assert (plan.num_cpus, plan.max_replicas, plan.initial_replicas, plan.predict_threads) == (0.5, 4, 2, 3)
    shared = replica_plan(app.model("faulty"), ClusterSize(cpus=2, memory_bytes=16 * GIB), apps_sharing=2)
    assert shared.max_replicas * shared.num_cpus <= 1 and "2 apps share it" in shared.note


def test_an_unknown_pod_type_is_planned_as_the_default_and_named(tmp_path):
    app = read_app(_app(tmp_path, {"podType": "highmem-xl"}))
    plan = replica_plan(app.model("faulty"), ClusterSize(cpus=64, memory_bytes=512 * GIB))
    assert plan.pod.name == "regular-s" and "'highmem-xl' is not one of Dataloop's pod types" in plan.note
    assert (plan.min_replicas, plan.initial_replicas, plan.max_replicas) == (0, 1, 1)  # the platform's autoscaler defaults


@pytest.mark.parametrize("breakage,message", [
    ("no manifest", "dataloop.json not found"),
    ("bad json", "is not valid JSON"),
    ("no entry point", "which is not a file"),
    ("no models", "declares no components.models"),
])  # fmt: skip
def test_a_folder_that_cannot_be_served_is_refused_naming_the_file(tmp_path, breakage, message):
    folder = _app(tmp_path, {})
    manifest = json.loads((folder / "dataloop.json").read_text())
    if breakage == "no manifest":
        (folder / "dataloop.json").unlink()
    elif breakage == "bad json":
        (folder / "dataloop.json").write_text("{not json")
    elif breakage == "no entry point":
        (folder / "model_adapter.py").unlink()
    else:
        manifest["components"]["models"] = []
        (folder / "dataloop.json").write_text(json.dumps(manifest))
    with pytest.raises(AppError, match=message) as err:
        read_app(folder)
    assert str(folder) in str(err.value) and "\n" not in str(err.value)


def test_a_model_name_must_be_one_of_the_manifests():
    app = read_app(FAULTY)
    with pytest.raises(AppError, match="has 3 models .faulty, slow, unloadable.: name one with --model"):
        app.model()
    with pytest.raises(AppError, match="has no model 'nope'"):
        app.model("nope")


# ---- importing the deployment for an exported model keeps dtlpy out -------------------------------


def test_a_replica_of_an_exported_model_never_imports_dtlpy(yolo_export):
    """Importing the deployment, building its contract for an export folder and answering a request: no dtlpy."""
    code = f"""
import asyncio, sys
from detserve.serve.app import Replica
replica = Replica({{"model": {str(yolo_export)!r}}})
import numpy as np
body = asyncio.run(replica.detect([np.full((96, 128, 3), 200, np.uint8)], replica.params(), replica.deadline(None)))
assert body["results"][0]["width"] == 128, body
loaded = sorted(m for m in sys.modules if m == "dtlpy" or m.startswith("dtlpy."))
print("DTLPY", loaded)
"""
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, cwd=str(ROOT))
    assert done.returncode == 0, done.stderr[-3000:]
    assert "DTLPY []" in done.stdout, done.stdout


# ---- the offline entity and the request item (dtlpy) ---------------------------------------------


def test_the_model_entity_is_built_from_the_manifest_with_every_key_dtlpy_reads(no_network):
    import dtlpy as dl

    from detserve.adapters.user_adapter import DTLPY_CONFIGURATION, model_entity

    app = read_app(FASTERRCNN)
    entity = model_entity(app, app.model())
    assert isinstance(entity, dl.Model) and entity.name == "fasterrcnn-shapes"
    assert entity.labels == ["circle", "square", "triangle", "star"]
    assert (entity.input_type, entity.output_type) == ("image", "box")
    assert set(DTLPY_CONFIGURATION) <= set(entity.configuration)
    assert entity.configuration["conf_threshold"] == 0.5 and entity.configuration["batch_size"] == 4
    adapter = dl.BaseModelAdapter()
    adapter.model_entity = entity  # dtlpy's AdapterDefaults read every key they know here
    assert adapter.configuration.get("a key nobody set", 7) == 7  # a missing key stays local, no platform call


def test_a_request_image_is_an_item_prepare_item_func_can_use(tmp_path, no_network):
    import dtlpy as dl

    from detserve.adapters.user_adapter import RequestItem
    from detserve.runtime.images import probe

    data = encode(np.full((30, 40, 3), (10, 20, 30), np.uint8), "JPEG")
    item = RequestItem.of(data, probe(data))
    assert isinstance(item, dl.Item)
    assert (item.width, item.height, item.mimetype) == (40, 30, "image/jpeg") and item.name.endswith(".jpg")
    buffer = item.download(save_locally=False)
    assert buffer.getvalue() == data and buffer.name == item.name
    assert Image.open(item.download(save_locally=False)).size == (40, 30)
    assert item.download(to_array=True).shape == (30, 40, 3)
    path = Path(item.download())
    assert path.read_bytes() == data and path.name == item.name
    assert Path(item.download(local_path=str(tmp_path))) == tmp_path / "items" / item.name
    assert Path(item.download(local_path=str(tmp_path / "one.jpg"))).read_bytes() == data
    del item, buffer
    gc.collect()
    assert not path.exists()  # the item's own folder goes with it


# ---- the contract's stages around the adapter's own code ------------------------------------------


@pytest.fixture(scope="module")
def tutorial():
    from detserve.serve.adapter_model import AdapterModel

    model = AdapterModel(TUTORIAL)
    model.setup()
    return model


@pytest.fixture(scope="module")
def faulty():
    from detserve.serve.adapter_model import AdapterModel

    model = AdapterModel(FAULTY, "faulty")
    model.setup()
    return model


def run(model, images: list[bytes], params=None) -> list:
    from detserve.serve.batching import BatchTimings

    items = [model.prepare(data, Limits()) for data in images]
    return model.predict(items, [params if params is not None else model.params()] * len(items), BatchTimings())


def test_the_tutorial_adapter_answers_as_it_does_when_called_directly(tutorial, scenes, no_network):
    """prepare (its prepare_item_func on a request item) + one predict call for the batch = the adapter itself."""
    from detserve.adapters.user_adapter import RequestItem
    from detserve.runtime.images import probe

    images = [encode(s.image) for s in scenes[:3]]
    served = run(tutorial, images)
    adapter = tutorial.adapter
    direct = adapter.predict([adapter.prepare_item_func(RequestItem.of(b, probe(b))) for b in images])
    assert served == [c.to_json()["annotations"] for c in direct]
    assert sum(map(len, served)) > 0
    assert tutorial.stats()["predict_batch_sizes"][3] >= 1  # one predict call for the three images
    assert tutorial.describe()["parameters"] == {"conf": None, "iou": None, "max_det": None}  # it reads none of them
    assert tutorial.params(conf=0.9, iou=0.1, max_det=1) == ()  # so a request's values are ignored


def test_a_request_setting_reaches_an_adapter_only_through_a_key_it_reads(scenes, no_network):
    from detserve.serve.adapter_model import AdapterModel

    model = AdapterModel(FASTERRCNN)
    model.setup()
    assert model.describe()["parameters"] == {"conf": "conf_threshold", "iou": None, "max_det": None}
    images = [encode(s.image) for s in scenes[:2]]
    strict, default = run(model, images, model.params(conf=0.95)), run(model, images)
    assert sum(map(len, strict)) < sum(map(len, default))
    assert all(a["metadata"]["user"]["model"]["confidence"] >= 0.95 for r in strict for a in r)
    assert model.configuration["conf_threshold"] == 0.5  # the adapter's own value is back


def test_an_image_the_adapter_cannot_prepare_is_that_images_error(faulty, no_network):
    with pytest.raises(ImageError) as err:
        run(faulty, [solid((9, 9, 9), (8, 8))])
    assert err.value.code == "prepare_failed" and "needs at least 16 px" in err.value.message
    with pytest.raises(ImageError) as err:  # not an image at all: detserve says so before the adapter sees it
        run(faulty, [b"junk"])
    assert err.value.code == "not_an_image"
    with pytest.raises(ImageError) as err:
        faulty.prepare(solid((1, 1, 1), (300, 300)), Limits(max_pixels=1000))
    assert err.value.code == "too_many_pixels"


@pytest.mark.parametrize("colour,code,says", [
    ((255, 0, 0), "inference_failed", "predict raised RuntimeError: a red image"),
    ((0, 255, 0), "invalid_prediction", "returned 1 result(s) for a batch of 2 image(s)"),
    ((0, 0, 255), "invalid_prediction", "predict returned a dict for image 0 of a batch of 2"),
])  # fmt: skip
def test_a_failing_predict_fails_its_batch_with_a_message_saying_what_came_back(faulty, colour, code, says, no_network):
    results = run(faulty, [solid(colour), solid((90, 90, 90))])
    assert [type(r).__name__ for r in results] == [type(results[0]).__name__] * 2
    assert all(isinstance(r, Exception) and r.code == code and says in str(r) for r in results), results
    [ok] = run(faulty, [solid((90, 90, 90))])  # the next batch is answered
    assert ok[0]["label"] == "quarter" and ok[0]["coordinates"][1] == {"x": 32.0, "y": 24.0, "z": 0}


def test_the_adapter_check_says_in_one_line_what_failed_and_where(no_network):
    from detserve.adapters.user_adapter import check

    assert check(TUTORIAL, []) is None
    unimportable = check(UNIMPORTABLE, [])
    assert unimportable.startswith(f"{UNIMPORTABLE / 'model_adapter.py'}: cannot import the adapter module: ModuleNotFoundError")
    unloadable = check(FAULTY, ["unloadable"])
    assert unloadable.startswith(f"{FAULTY / 'model_adapter.py'}: Adapter.load(") and "FileNotFoundError: no weights at" in unloadable
    assert "\n" not in unimportable + unloadable


def test_configuration_overrides_run_together_when_equal_and_apart_when_not():
    from detserve.serve.adapter_model import ConfigurationOverrides

    overrides, configuration = ConfigurationOverrides(), {"conf_thres": 0.25}
    inside, release, seen = threading.Event(), threading.Event(), []

    def call(values, hold: bool):
        with overrides.applied(configuration, values):
            seen.append(dict(configuration))
            if hold:
                inside.set()
                release.wait(5)

    first = threading.Thread(target=call, args=((("conf_thres", 0.9),), True))
    first.start()
    assert inside.wait(5)
    same = threading.Thread(target=call, args=((("conf_thres", 0.9),), False))
    same.start()
    same.join(5)
    assert not same.is_alive()  # equal values: ran beside the first
    other = threading.Thread(target=call, args=((), False))
    other.start()
    other.join(0.3)
    assert other.is_alive()  # the adapter's own values: waits until the overrides are done
    release.set()
    for thread in (first, other):
        thread.join(5)
    assert seen == [{"conf_thres": 0.9}, {"conf_thres": 0.9}, {"conf_thres": 0.25}] and configuration == {"conf_thres": 0.25}
