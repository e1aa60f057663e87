"""The Dataloop app manifests (adapters/apps/*/dataloop.json) against the adapters and dtlpy 1.126.5.

Offline: dtlpy's entities parse the manifests without a platform, and a model
built from each configuration must make no platform call (dtlpy writes a
missing configuration key back with ``model.update()`` when it reads it).
"""

from __future__ import annotations

import ast
import copy
import dataclasses
import importlib
import json
import re

import pytest

import detserve.runtime.offline

detserve.runtime.offline.apply()

import dtlpy as dl  # noqa: E402
from dtlpy.ml.base_model_adapter import AdapterDefaults  # noqa: E402

from detserve.adapters.base import CONFIG_KEYS, label_map  # noqa: E402
from detserve.training.synthetic import CLASSES  # noqa: E402
from tests.conftest import ROOT  # noqa: E402

APPS = ROOT / "adapters" / "apps"
README = APPS / "README.md"

#: family -> (entry point, class name, first class id, compute-config name prefix)
FAMILIES = {
    "yolo": ("adapters/yolo.py", "YoloAdapter", 0, "yolo"),
    "fasterrcnn": ("adapters/fasterrcnn.py", "FasterRCNNAdapter", 1, "fasterrcnn"),
}

#: pod target -> what its compute config and model must say
TARGETS = {
    "regular-m": {"podType": "regular-m", "backend": "onnxruntime", "device": "cpu", "half": False, "image": "-cpu"},
    "gpu-t4": {"podType": "gpu-t4", "backend": "tensorrt", "device": "cuda:0", "half": True, "image": "-gpu-cu13"},
    "gpu-v100": {"podType": "gpu-v100", "backend": "onnxruntime", "device": "cuda:0", "half": True, "image": "-gpu-cu12"},
    "gpu-a100": {"podType": "gpu-a100", "backend": "tensorrt", "device": "cuda:0", "half": True, "image": "-gpu-cu13"},
}

FUNCTIONS = {"predict_items", "predict_dataset", "train_model", "evaluate_model"}


def configuration_reads(source: str) -> set[str]:
    """Keys read from a configuration in ``source``: ``x._config("k")``, ``x.configuration.get("k")``,
    ``x.adapter_defaults.get("k")``, ``x._plain_config().get("k")``, ``configuration.get("k")``."""
    keys = set()
    for node in ast.walk(ast.parse(source)):
        if not (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.args):
            continue
        first = node.args[0]
        if not (isinstance(first, ast.Constant) and isinstance(first.value, str)):
            continue
        func, owner = node.func, node.func.value
        owner_name = owner.attr if isinstance(owner, ast.Attribute) else owner.id if isinstance(owner, ast.Name) else None
        if isinstance(owner, ast.Call) and isinstance(owner.func, ast.Attribute):
            owner_name = owner.func.attr
        if func.attr == "_config" or (func.attr == "get" and owner_name in ("configuration", "adapter_defaults", "_plain_config")):
            keys.add(first.value)
    return keys


def _dtlpy_keys() -> set[str]:
    import inspect

    from dtlpy.ml import base_model_adapter

    read = {f.name for f in dataclasses.fields(AdapterDefaults)} | configuration_reads(inspect.getsource(base_model_adapter))
    # Only embed_* (not an app function here) reads embeddings_size; column is for db_row items, from the plain dict.
    return read - {"embeddings_size", "column"}


def _detserve_keys() -> set[str]:
    return set().union(*(configuration_reads(path.read_text()) for path in (ROOT / "adapters").glob("*.py")))


#: what dtlpy's BaseModelAdapter reads from model.configuration (derived from dtlpy's source)
DTLPY_KEYS = _dtlpy_keys()
#: what the detserve adapters read (derived from adapters/*.py)
DETSERVE_KEYS = _detserve_keys()

DEFAULTS = {
    "yolo": {"conf_thres": 0.25, "iou_thres": 0.45, "max_det": 300},
    "fasterrcnn": {"conf_thres": 0.5, "max_det": 100},
}

#: pod types confirmed by dtlpy 1.126.5's InstanceCatalog; the others must be named in the README
KNOWN_POD_TYPES = {"regular-m", "gpu-t4"}


def load(family: str) -> dict:
    return json.loads((APPS / family / "dataloop.json").read_text())


@pytest.fixture(params=sorted(FAMILIES), scope="module")
def app(request) -> tuple[str, dict]:
    return request.param, load(request.param)


def by_name(entries: list[dict]) -> dict[str, dict]:
    names = [entry["name"] for entry in entries]
    assert len(names) == len(set(names)), f"duplicate names: {names}"
    return {entry["name"]: entry for entry in entries}


def targets_of(family: str, manifest: dict):
    """(target, compute config, module, model) for each pod target."""
    prefix = FAMILIES[family][3]
    configs = by_name(manifest["components"]["computeConfigs"])
    modules = by_name(manifest["components"]["modules"])
    models = manifest["components"]["models"]
    for target in TARGETS:
        config = configs[f"{prefix}-{target}"]
        [module] = [m for m in modules.values() if m["computeConfig"] == config["name"]]
        [model] = [m for m in models if m["moduleName"] == module["name"]]
        yield target, config, module, model


# -- the manifest as a file and as dtlpy entities -------------------------------------------


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_manifest_is_valid_json_with_app_fields(family):
    manifest = load(family)
    assert manifest["name"] and manifest["displayName"] and manifest["description"]
    assert manifest["version"] == "0.1.0"
    assert manifest["scope"] == "project"
    attributes = manifest["attributes"]
    assert attributes["Category"] == "Model"
    assert attributes["Computer Vision"] == "Object Detection"
    assert "Image" in attributes["Media Type"]
    assert attributes["Provider"] and attributes["Deployed By"]
    codebase = manifest["codebase"]
    assert codebase["type"] in ("git", "local", "item")
    if codebase["type"] == "git":
        assert codebase["gitUrl"].endswith(".git") and codebase["gitTag"]


def test_app_names_do_not_collide():
    yolo, frcnn = load("yolo"), load("fasterrcnn")
    assert yolo["name"] != frcnn["name"]
    for part in ("computeConfigs", "modules", "models"):
        a = {e["name"] for e in yolo["components"][part]}
        b = {e["name"] for e in frcnn["components"][part]}
        assert not a & b, f"{part} shared by both apps: {a & b}"


def test_parses_as_dtlpy_dpk(app):
    family, manifest = app
    dpk = dl.entities.Dpk.from_json(_json=copy.deepcopy(manifest), client_api=dl.client_api, project=None)
    assert dpk.name == manifest["name"] and dpk.version == manifest["version"]
    assert dpk.codebase.type == manifest["codebase"]["type"]
    modules = dpk.components.modules
    assert len(modules) == len(TARGETS)
    for module in modules:
        assert isinstance(module, dl.entities.PackageModule)
        assert {f.name for f in module.functions} >= FUNCTIONS
    configs = dpk.components.compute_configs
    assert {c.name for c in configs} == {m.compute_config for m in modules}
    for config in configs:
        runtime = dl.KubernetesRuntime(**config.runtime)
        assert isinstance(runtime.autoscaler, dl.KubernetesRabbitmqAutoscaler)
        assert runtime.to_json()["podType"] == config.runtime["podType"]


# -- modules: entry points, classes, functions -------------------------------------------------


def test_entry_point_file_defines_the_class(app):
    family, manifest = app
    entry, cls_name, _, _ = FAMILIES[family]
    for module in manifest["components"]["modules"]:
        assert module["entryPoint"] == entry
        assert module["className"] == cls_name
        path = ROOT / module["entryPoint"]
        assert path.is_file(), path
        classes = {node.name for node in ast.walk(ast.parse(path.read_text())) if isinstance(node, ast.ClassDef)}
        assert cls_name in classes, f"{path} defines {sorted(classes)}, not {cls_name}"
        assert module["initInputs"] == [{"type": "Model", "name": "model_entity"}]


def test_class_is_a_dtlpy_model_adapter_with_the_functions(app):
    family, manifest = app
    entry, cls_name, _, _ = FAMILIES[family]
    adapter_cls = getattr(importlib.import_module(entry[: -len(".py")].replace("/", ".")), cls_name)
    assert isinstance(adapter_cls, type) and issubclass(adapter_cls, dl.BaseModelAdapter)
    assert adapter_cls.family == family
    for module in manifest["components"]["modules"]:
        names = {function["name"] for function in module["functions"]}
        assert names >= FUNCTIONS, f"{module['name']} lacks {FUNCTIONS - names}"
        for name in names:
            assert callable(getattr(adapter_cls, name, None)), f"{cls_name} has no {name}"


def test_function_io_matches_dtlpy_signatures(app):
    _, manifest = app
    expected = {
        "predict_items": (["Item[]"], ["Item[]", "Annotation[]"]),
        "predict_dataset": (["Dataset", "Json"], []),
        "train_model": (["Model"], ["Model"]),
        "evaluate_model": (["Model", "Dataset", "Json"], ["Model", "Dataset"]),
    }
    for module in manifest["components"]["modules"]:
        for function in module["functions"]:
            inputs = [io["type"] for io in function["input"]]
            outputs = [io["type"] for io in function["output"]]
            assert (inputs, outputs) == expected[function["name"]], (module["name"], function["name"])


# -- compute configs and what each one runs ---------------------------------------------------


def test_four_compute_configs_with_their_pod_backend_and_image(app):
    family, manifest = app
    assert len(manifest["components"]["computeConfigs"]) == len(TARGETS)
    for target, config, module, model in targets_of(family, manifest):
        want = TARGETS[target]
        runtime = config["runtime"]
        assert runtime["podType"] == want["podType"]
        assert runtime["runnerImage"].endswith(want["image"]), runtime["runnerImage"]
        assert isinstance(runtime["concurrency"], int) and runtime["concurrency"] >= 1
        autoscaler = runtime["autoscaler"]
        assert autoscaler["type"] == "rabbitmq"
        assert 0 <= autoscaler["minReplicas"] <= autoscaler["maxReplicas"]
        assert autoscaler["queueLength"] > 0
        assert config["versions"] == {"dtlpy": dl.__version__}
        assert config["description"]
        configuration = model["configuration"]
        assert configuration["backend"] == want["backend"], (target, configuration["backend"])
        assert configuration["device"] == want["device"], (target, configuration["device"])
        assert configuration["half"] is want["half"]


def test_v100_runs_onnxruntime_not_tensorrt(app):
    family, manifest = app
    [(config, model)] = [(c, m) for t, c, _, m in targets_of(family, manifest) if t == "gpu-v100"]
    assert model["configuration"]["backend"] == "onnxruntime"
    assert "tensorrt" not in json.dumps(model["configuration"]).lower()
    assert "cu13" not in config["runtime"]["runnerImage"]
    description = config["description"]
    assert "NO TensorRT" in description and "Volta" in description and "sm_70" in description


def test_tensorrt_pods_say_where_the_engine_is_built(app):
    family, manifest = app
    for target, config, _, _ in targets_of(family, manifest):
        if TARGETS[target]["backend"] == "tensorrt":
            assert f"--pod {target}" in config["description"]
            assert "built on" in config["description"]


def test_pod_types_against_dtlpy_instance_catalog():
    catalog = {pod.value for pod in dl.InstanceCatalog}
    assert KNOWN_POD_TYPES <= catalog
    used = {c["runtime"]["podType"] for family in FAMILIES for c in load(family)["components"]["computeConfigs"]}
    unverified = used - catalog
    # Not in dtlpy 1.126.5's catalog: the README must say so, by name.
    assert unverified <= {"gpu-v100", "gpu-a100"}, unverified
    section = README.read_text().split("### Pod types that could not be verified", 1)[1].split("\n## ", 1)[0]
    for pod in unverified:
        assert f"`{pod}`" in section, f"README does not list {pod} as unverified"


# -- models: configuration, labels, types -----------------------------------------------------


def test_the_key_lists_are_derived_from_the_code():
    """The parse finds what the adapters and dtlpy read, so a new key in the code fails the manifest test."""
    assert {"conf_thres", "iou_thres", "max_det", "epochs", "train_device", "threads", "weights_filename"} <= DETSERVE_KEYS
    assert DETSERVE_KEYS <= set(CONFIG_KEYS), f"adapters/base.py's CONFIG_KEYS lacks {DETSERVE_KEYS - set(CONFIG_KEYS)}"
    for key in CONFIG_KEYS:
        assert f"``{key}``" in importlib.import_module("detserve.adapters.base").__doc__, f"{key} is not documented"
    assert {"batch_size", "predict_embed_subset_limit", "predict_embed_timeout", "include_background",
            "root_path", "data_path", "output_path", "include_model_annotations"} <= DTLPY_KEYS  # fmt: skip


def test_every_model_configuration_has_all_keys(app):
    _, manifest = app
    for model in manifest["components"]["models"]:
        keys = set(model["configuration"])
        assert DTLPY_KEYS <= keys, f"{model['name']} lacks dtlpy keys {DTLPY_KEYS - keys}"
        assert DETSERVE_KEYS <= keys, f"{model['name']} lacks detserve keys {DETSERVE_KEYS - keys}"
        configuration = model["configuration"]
        assert configuration["artifact"] == "detserve"
        assert isinstance(configuration["batch_size"], int) and configuration["batch_size"] >= 1
        for key in ("epochs", "train_batch_size", "threads"):
            assert isinstance(configuration[key], int) and configuration[key] >= 1, key


def test_thresholds_are_the_model_defaults(app):
    family, manifest = app
    for model in manifest["components"]["models"]:
        for key, value in DEFAULTS[family].items():
            assert model["configuration"][key] == value, (model["name"], key)


def test_labels_are_the_default_classes(app):
    family, manifest = app
    first_id = FAMILIES[family][2]
    classes = list(CLASSES)
    assert classes == ["circle", "square", "triangle", "star"]
    for model in manifest["components"]["models"]:
        configuration = model["configuration"]
        assert model["labels"] == classes
        assert configuration["labels"] == classes
        assert configuration["id_to_label_map"] == {str(i + first_id): name for i, name in enumerate(classes)}
        # The adapter's own mapping for a manifest with this family's id convention.
        manifest_labels = {i + first_id: name for i, name in enumerate(classes)}
        assert label_map(manifest_labels, configuration) == manifest_labels


def test_input_and_output_types(app):
    _, manifest = app
    for model in manifest["components"]["models"]:
        assert model["inputType"] == "image"
        assert model["outputType"] == "box"
        assert model["scope"] == "project"
        assert model["status"] in ("pre-trained", "trained")


def test_configuration_makes_no_platform_call(app):
    """dtlpy writes a missing key back with model.update(); a complete configuration never does."""
    family, manifest = app
    entry, cls_name, _, _ = FAMILIES[family]
    adapter_cls = getattr(importlib.import_module(entry[: -len(".py")].replace("/", ".")), cls_name)
    for raw in manifest["components"]["models"]:
        model = dl.Model.from_json(_json={"id": f"test-{raw['name']}", **copy.deepcopy(raw)}, client_api=dl.client_api)
        calls = []
        model.update = lambda *args, **kwargs: calls.append((args, kwargs))  # noqa: B023
        adapter = adapter_cls()
        adapter.model_entity = model  # builds dtlpy's AdapterDefaults over the configuration
        assert adapter.configuration.get("batch_size") == raw["configuration"]["batch_size"]
        assert adapter.configuration.get("include_background") is False
        for key in ("root_path", "data_path", "output_path", "upload_features"):
            assert adapter.adapter_defaults.resolve(key, None) is None
        assert calls == [], f"{raw['name']}: dtlpy called model.update() for a missing key"
        assert model.id_to_label_map == {int(k): v for k, v in raw["configuration"]["id_to_label_map"].items()}


# -- runner images ------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["Dockerfile.cpu", "Dockerfile.gpu"])
def test_runner_images_are_offline_and_not_root(name):
    text = (APPS / name).read_text()
    for variable in ("ORT_DISABLE_TELEMETRY=1", "YOLO_OFFLINE=1", "YOLO_AUTOINSTALL=0", "RAY_USAGE_STATS_ENABLED=0"):
        assert variable in text, f"{name} does not set {variable}"
    users = re.findall(r"^USER\s+(\S+)", text, flags=re.MULTILINE)
    assert users and users[-1].split(":")[0] not in ("root", "0"), users
    assert "pip install -r requirements.lock" in text
    if name == "Dockerfile.cpu":
        assert re.search(r"^FROM python:3\.11-slim", text, flags=re.MULTILINE)
        assert "pip install --no-deps ." in text
    else:
        assert re.search(r"^ARG CUDA13_IMAGE=nvidia/cuda:13\.\S*cudnn-runtime", text, flags=re.MULTILINE)
        assert "'.[gpu]'" in text


@pytest.mark.parametrize("name", ["Dockerfile.cpu", "Dockerfile.gpu"])
def test_runner_images_copy_every_package_folder_and_import_by_the_namespace(name):
    """`pip install .` in the image needs every folder pyproject's package-dir maps (a missing
    runtime/ fails the build), and its import check may only use the detserve namespace."""
    import tomllib

    text = (APPS / name).read_text()
    package_dirs = set(tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["package-dir"].values())
    copied = set(re.findall(r"^COPY\s+(\S+)\s+\./\1\s*$", text, flags=re.MULTILINE))
    assert package_dirs <= copied, f"{name} does not COPY {sorted(package_dirs - copied)}"
    [check] = re.findall(r'python -c "import ([^;"]+)', text)
    modules = [m.strip().split(" as ")[0] for m in check.split(",")]
    assert "detserve.adapters.yolo" in modules and "detserve.adapters.fasterrcnn" in modules, modules
    generic = {"runtime", "training", "export", "adapters", "serve", "benchmarks"}
    assert not [m for m in modules if m.split(".")[0] in generic], modules
