"""A user's own ``dl.BaseModelAdapter``, built offline the way the Dataloop platform builds it.

The platform, for a model of an app: imports the class the module names,
builds the model entity, instantiates the adapter and calls
``load_from_model``, which downloads the artifacts and calls ``load(local_path)``.
Then ``predict_items`` prepares each item with ``prepare_item_func`` and calls
``predict(batch)``. Here, without a platform (never a platform call):

- the model entity is built from ``dataloop.json`` (:func:`model_entity`): name,
  configuration (filled with every key dtlpy reads, since dtlpy writes a
  missing key back to the platform), labels, input and output types; its
  ``update`` stays local;
- ``load_from_model`` runs with no artifacts to download and ``local_path`` =
  the folder's artifacts (:func:`load_adapter`);
- each image of a request is a :class:`RequestItem`, a ``dl.Item`` whose
  ``download`` hands out the request's bytes.

An adapter written for the platform runs unchanged. Failures are
:class:`AdapterError` with one line that names the file and the error.
"""

from __future__ import annotations

import ast
import hashlib
import importlib.util
import io
import logging
import shutil
import sys
import tempfile
import uuid
import weakref
from pathlib import Path
from typing import Any

from detserve.runtime import offline

offline.apply()

import dtlpy as dl  # noqa: E402

from detserve.adapters.dataloop_app import AdapterApp, AppModel  # noqa: E402
from detserve.runtime.images import ImageHeader  # noqa: E402

log = logging.getLogger("detserve.adapters")

#: What dtlpy's ``BaseModelAdapter`` reads from a configuration, with its own defaults
#: (``AdapterDefaults``, ``predict_items``, ``prepare_data``, ``predict_dataset``/``embed_*``).
DTLPY_CONFIGURATION = {
    "include_background": False,
    "upload_annotations": True,
    "clean_annotations": True,
    "overwrite_annotations": True,
    "upload_features": None,
    "root_path": None,
    "data_path": None,
    "output_path": None,
    "include_model_annotations": False,
    "predict_embed_subset_limit": 1000,
    "predict_embed_timeout": 86400,
    "batch_size": 4,
}

#: A request's ``conf``/``iou``/``max_det`` -> the configuration keys an adapter may read them from, in order of
#: preference: detserve's and Ultralytics-style names first, then those of Dataloop's own apps.
PARAMETER_KEYS = {
    "conf": ("conf_thres", "conf_threshold", "confidence_threshold", "score_threshold"),
    "iou": ("iou_thres", "iou_threshold", "nms_threshold"),
    "max_det": ("max_det", "max_detections"),
}


class AdapterError(RuntimeError):
    """An adapter that cannot be served: one line that names the file and the error."""


# ---- the model entity ----------------------------------------------------------------


def model_entity(app: AdapterApp, model: AppModel) -> dl.Model:
    """The ``dl.Model`` the platform would hand the adapter, built from the manifest, offline."""
    entry = model.entry
    configuration = {**DTLPY_CONFIGURATION, **model.configuration}
    entity = dl.Model.from_json(
        {
            "id": f"local-{app.name}-{model.name}",
            "name": model.name,
            "configuration": configuration,
            "labels": model.labels,
            "inputType": entry.get("inputType", "image"),
            "outputType": entry.get("outputType", "box"),
            "moduleName": entry.get("moduleName"),
            "description": entry.get("description"),
            "status": entry.get("status", "pre-trained"),
            "scope": entry.get("scope", "project"),
            "artifacts": [],  # load_from_model then downloads nothing and goes straight to load(local_path)
        },
        client_api=dl.client_api,
    )

    def update(*args, **kwargs):
        # dtlpy writes a configuration key it had to add (a .get(key, default) the manifest did not fill) back to
        # the platform with update(); here it stays in the local dict.
        log.debug("model %s: configuration changed locally (no platform to update)", model.name)
        return entity

    entity.update = update
    return entity


# ---- one request image as a Dataloop item --------------------------------------------------


class RequestItem(dl.Item):
    """One image of a request, as ``prepare_item_func`` expects a platform item.

    ``download(save_locally=False)`` returns the request's bytes as a ``BytesIO``
    (named like the item), ``download()`` writes them to a file and returns its
    path, ``to_array=True`` gives the pixels as dtlpy does; ``name``,
    ``mimetype``, ``width`` and ``height`` (as stored, before EXIF orientation)
    come from the image's header. It belongs to no dataset: its
    ``annotations``, ``dataset`` and ``project`` are the platform's, not here.
    """

    @classmethod
    def of(cls, data: bytes, header: ImageHeader) -> "RequestItem":
        item_id = uuid.uuid4().hex
        extension = {"JPEG": "jpg", "MPO": "jpg"}.get(header.format, header.format.lower())
        name = f"image-{item_id[:8]}.{extension}"
        item = cls.from_json(
            {
                "id": item_id,
                "name": name,
                "filename": f"/{name}",
                "type": "file",
                "metadata": {
                    "system": {
                        "mimetype": header.mimetype, "width": header.width, "height": header.height,
                        "size": len(data), "originalname": name,
                    }
                },
            },
            client_api=dl.client_api,
        )  # fmt: skip
        item._request_bytes = data
        item._folder = None
        return item

    def download(self, local_path=None, file_types=None, save_locally=True, to_array=False, overwrite=False, to_items_folder=True, **kwargs):
        data = self._request_bytes
        if not save_locally or to_array:
            buffer = io.BytesIO(data)
            buffer.name = self.name
            if to_array:
                import numpy as np
                from PIL import Image

                return np.asarray(Image.open(buffer))
            return buffer
        if local_path is None:
            target = self._own_folder() / self.name
        else:
            local_path = Path(local_path)
            if local_path.is_dir() or not local_path.suffix:
                target = (local_path / "items" if to_items_folder else local_path) / self.name
            else:
                target = local_path
        target.parent.mkdir(parents=True, exist_ok=True)
        if overwrite or not target.exists():
            target.write_bytes(data)
        return str(target)

    def _own_folder(self) -> Path:
        # Removed when the item is: a request's files live as long as its images are in flight.
        if self._folder is None:
            self._folder = Path(tempfile.mkdtemp(prefix="detserve-item-"))
            weakref.finalize(self, shutil.rmtree, str(self._folder), True)
        return self._folder


# ---- loading -----------------------------------------------------------------------------


def import_adapter_class(app: AdapterApp, model: AppModel) -> type:
    """The class the manifest's module names, imported from its entry point (the folder on ``sys.path``, as on the platform)."""
    path = model.entry_point
    module_name = f"detserve_user_adapter_{hashlib.sha1(str(path).encode()).hexdigest()[:10]}"
    module = sys.modules.get(module_name)
    if module is None:
        if str(app.folder) not in sys.path:
            sys.path.insert(0, str(app.folder))  # the adapter's own imports (utils/, ...) resolve as on the platform
        spec = importlib.util.spec_from_file_location(module_name, path)
        module = importlib.util.module_from_spec(spec)
        sys.modules[module_name] = module
        try:
            spec.loader.exec_module(module)
        except BaseException as exc:
            del sys.modules[module_name]
            raise AdapterError(f"{path}: cannot import the adapter module: {one_line(exc)}") from exc
    cls = getattr(module, model.class_name, None)
    if cls is None:
        raise AdapterError(f"{path}: defines no class {model.class_name!r} (the className of its module in dataloop.json)")
    if not (isinstance(cls, type) and issubclass(cls, dl.BaseModelAdapter)):
        raise AdapterError(f"{path}: {model.class_name} is not a dtlpy.BaseModelAdapter subclass")
    return cls


def load_adapter(app: AdapterApp, model: AppModel) -> dl.BaseModelAdapter:
    """Import, instantiate and load the adapter as the platform does: ``load_from_model`` with the folder's artifacts."""
    cls = import_adapter_class(app, model)
    entity = model_entity(app, model)
    where = f"{model.entry_point}: {model.class_name}"
    # dtlpy warns about model_info names on every construction: not news to someone serving their adapter.
    quiet = logging.getLogger("ModelAdapter")
    level = quiet.level
    quiet.setLevel(logging.ERROR)
    try:
        adapter = cls()
    except Exception as exc:
        raise AdapterError(f"{where}() failed: {one_line(exc)}") from exc
    finally:
        quiet.setLevel(level)
    try:
        adapter.load_from_model(model_entity=entity, local_path=str(model.artifacts))
    except Exception as exc:
        raise AdapterError(f"{where}.load({model.artifacts}) failed: {one_line(exc)}") from exc
    return adapter


def one_line(exc: BaseException) -> str:
    """An exception as one line: its type and message, whitespace folded."""
    text = " ".join(str(exc).split())
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


# ---- what the adapter reads ----------------------------------------------------------------


def parameter_keys(app: AdapterApp, model: AppModel) -> dict[str, str | None]:
    """For ``conf``, ``iou`` and ``max_det``: the configuration key the adapter reads it from, or None.

    Read from the adapter module's source: the first of :data:`PARAMETER_KEYS` that appears there as a
    string. An adapter that never names a key never reads it, so a request's value for it is ignored.
    """
    strings = {node.value for node in ast.walk(ast.parse(model.entry_point.read_text())) if isinstance(node, ast.Constant) and isinstance(node.value, str)}
    return {param: next((key for key in keys if key in strings), None) for param, keys in PARAMETER_KEYS.items()}


# ---- what predict returns --------------------------------------------------------------------


class InvalidOutput(ValueError):
    """``predict`` returned something other than one annotation collection per image."""


def annotations_json(output: Any, batch_size: int) -> list[list[dict]]:
    """``predict``'s return value -> each image's annotations as Dataloop JSON, or :class:`InvalidOutput` saying what came back.

    As ``predict_items`` takes it: one ``dl.AnnotationCollection`` per image, in batch order (a plain list of
    ``dl.Annotation`` is taken too, as dtlpy does).
    """
    fix = "predict(batch) must return a list with one dl.AnnotationCollection per image of the batch, in batch order"
    if not isinstance(output, (list, tuple)):
        raise InvalidOutput(f"predict returned {_what(output)} for a batch of {batch_size} image(s): {fix}")
    if len(output) != batch_size:
        raise InvalidOutput(f"predict returned {len(output)} result(s) for a batch of {batch_size} image(s): {fix}")
    out = []
    for i, entry in enumerate(output):
        if isinstance(entry, dl.AnnotationCollection):
            annotations = entry.annotations
        elif isinstance(entry, list) and all(isinstance(a, dl.Annotation) for a in entry):
            annotations = entry
        else:
            raise InvalidOutput(f"predict returned {_what(entry)} for image {i} of a batch of {batch_size}: {fix}")
        out.append([annotation.to_json() for annotation in annotations])
    return out


def _what(value: Any) -> str:
    if isinstance(value, (list, tuple)):
        kinds = sorted({type(v).__name__ for v in value})
        return f"a {type(value).__name__} of {len(value)} ({', '.join(kinds) or 'empty'})"
    return f"a {type(value).__name__}" if value is not None else "None"


# ---- checking a folder before serving it ------------------------------------------------------


def check(folder: str | Path, models: list[str]) -> str | None:
    """Import and load each model's adapter as a replica will; the one line that says what failed, or None."""
    from detserve.adapters.dataloop_app import AppError, read_app

    try:
        app = read_app(folder)
        for name in models or list(app.models):
            load_adapter(app, app.model(name))
    except (AdapterError, AppError) as exc:
        return str(exc)
    return None


if __name__ == "__main__":  # python -m detserve.adapters.user_adapter DIR [MODEL ...]: what `detserve serve --adapter` runs first
    problem = check(sys.argv[1], sys.argv[2:])
    if problem:
        print(problem)
    sys.exit(3 if problem else 0)
