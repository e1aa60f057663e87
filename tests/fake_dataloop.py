"""A fake Dataloop platform at dtlpy's download/upload boundary, for the lifecycle tests.

Everything above the boundary is dtlpy 1.126.5's own code (BaseModelAdapter's
flows, prepare_data, the downloader reading ``file://`` link items,
``download_annotations``, ``model.metrics.create``). Replaced:

- ``Items._list`` (the item query) and ``Datasets._export_recursive`` (the JSON
  export): answered from ``items``, item JSONs with their annotations;
- ``Artifacts.download`` / ``Artifacts.upload``: a local bucket folder per model;
- ``Models.update``: recorded;
- ``BaseModelAdapter._upload_model_annotations``: the predictions replace this
  model's boxes on the item (what the platform stores);
- ``ApiClient.gen_request``: ``POST /ml/metrics/publish`` (``model.metrics.create``)
  is recorded; any other request is recorded as unexpected and raises, and the
  fixture fails the test if there was one (dtlpy swallows some errors).
"""

from __future__ import annotations

import copy
import glob
import json
import os
import shutil
import tempfile
from pathlib import Path

import dtlpy as dl
from dtlpy import entities, repositories
from dtlpy.services.api_client import ApiClient

PROJECT_ID, DATASET_ID = "project-offline", "dataset-offline"


class FakePlatform:
    def __init__(self, root: Path):
        self.root = Path(root)
        self.items: dict[str, dict] = {}  # id -> item JSON with "annotations"
        self.updates: list[dict] = []
        self.uploads: list[list[str]] = []
        self.metrics: list[dict] = []  # the payload of POST /ml/metrics/publish
        self.unexpected: list[str] = []
        self.project = dl.Project.from_json(_json={"id": PROJECT_ID, "name": "offline"}, client_api=dl.client_api)
        self.dataset = dl.Dataset.from_json(
            _json={"id": DATASET_ID, "name": "shapes", "projects": [PROJECT_ID]}, client_api=dl.client_api, project=self.project
        )

    # --- building the platform's side ------------------------------------------
    def bucket(self, model_id: str) -> Path:
        path = self.root / "buckets" / model_id
        path.mkdir(parents=True, exist_ok=True)
        return path

    def add_item(self, path: Path, subset: str, boxes: list[tuple[float, float, float, float, str]]) -> str:
        """A link item ``/<subset>/<name>`` whose ref is the local file, annotated with ``boxes``."""
        item_id = f"{len(self.items):024x}"  # ObjectId-shaped, sorted in insertion order
        annotations = []
        for j, (left, top, right, bottom, label) in enumerate(boxes):
            ann = dl.Annotation.new(annotation_definition=dl.Box(left=left, top=top, right=right, bottom=bottom, label=label)).to_json()
            annotations.append(ann | {"id": f"gt-{item_id}-{j}", "itemId": item_id})
        self.items[item_id] = {
            "id": item_id, "name": path.name, "filename": f"/{subset}/{path.name}", "dir": f"/{subset}", "type": "file",
            "hidden": False, "datasetId": DATASET_ID, "annotated": bool(annotations),
            "metadata": {"system": {"mimetype": "image/png", "size": path.stat().st_size, "tags": {subset: True},
                                    "shebang": {"dltype": "link", "linkInfo": {"type": "url", "ref": path.resolve().as_uri()}}}},
            "annotations": annotations,
        }  # fmt: skip
        return item_id

    def item(self, item_id: str) -> dl.Item:
        js = {k: v for k, v in self.items[item_id].items() if k != "annotations"}
        return dl.Item.from_json(_json=js, client_api=dl.client_api, dataset=self.dataset)

    def model(self, name: str, configuration: dict, labels: list[str], status: str = "pre-trained") -> dl.Model:
        model = dl.Model.from_json(
            _json={
                "id": f"model-{name}", "name": name, "context": {"project": PROJECT_ID}, "datasetId": DATASET_ID,
                "configuration": copy.deepcopy(configuration), "inputType": "image", "outputType": "box",
                "labels": list(labels), "artifacts": [], "status": status,
                "metadata": {"system": {"subsets": {
                    subset: dl.Filters(field="dir", values=f"/{subset}").prepare() for subset in ("train", "validation")
                }}},
            },
            client_api=dl.client_api, project=self.project,
        )  # fmt: skip
        model._dataset = self.dataset  # else model.dataset asks the platform
        return model

    def predictions(self, model_name: str) -> dict[str, list[dict]]:
        """Item id -> the box annotations stored for ``model_name``."""
        return {
            item_id: [a for a in item["annotations"] if _model_name(a) == model_name] for item_id, item in self.items.items()
        }

    # --- the query language, as far as the flows use it -------------------------
    def matching(self, filters: dict) -> list[dict]:
        items = sorted(self.items.values(), key=lambda item: item["id"])
        if (filters.get("sort") or {}).get("id") == "descending":
            items.reverse()
        return [item for item in items if _matches(item, filters.get("filter") or {})]

    # --- the patched boundary ----------------------------------------------------
    def install(self, monkeypatch) -> None:
        platform = self

        def items_list(repo, filters):
            found = [{k: v for k, v in it.items() if k != "annotations"} for it in platform.matching(filters.prepare())]
            return {"items": found, "totalItemsCount": len(found), "hasNextPage": False, "totalPagesCount": 1}

        def export_recursive(repo, dataset=None, local_path=None, filters=None, annotation_filters=None, include_annotations=False, **kw):
            fdict = filters.prepare() if isinstance(filters, entities.Filters) else (filters or {})
            keep = _annotation_filter(annotation_filters)
            out = Path(local_path or tempfile.mkdtemp()) / "export.json"
            out.parent.mkdir(parents=True, exist_ok=True)
            exported = []
            for item in platform.matching(fdict):
                item = copy.deepcopy(item)
                item["annotations"] = [a for a in item["annotations"] if keep(a)] if include_annotations else []
                exported.append(item)
            out.write_text(json.dumps(exported))
            yield str(out)

        def artifacts_download(repo, local_path=None, overwrite=False, **kw):
            shutil.copytree(platform.bucket(repo.model.id), local_path, dirs_exist_ok=True)
            return local_path

        def artifacts_upload(repo, filepath, overwrite=False, **kw):
            bucket, names = platform.bucket(repo.model.id), []
            for path in glob.glob(filepath):
                target = bucket / os.path.basename(path)
                shutil.copytree(path, target, dirs_exist_ok=True) if os.path.isdir(path) else shutil.copy2(path, target)
                names.append(os.path.basename(path))
            platform.uploads.append(sorted(names))

        def models_update(repo, model, system_metadata=False, reload_services=True, **kw):
            platform.updates.append({"status": model.status, "configuration": copy.deepcopy(model.configuration)})
            return model

        def upload_model_annotations(adapter, item, predictions):
            stored = []
            for k, ann in enumerate(predictions.to_json()["annotations"]):
                stored.append(dict(ann, id=f"pred-{item.id}-{k}", itemId=item.id))
            record = platform.items[item.id]
            name = adapter.model_entity.name
            record["annotations"] = [a for a in record["annotations"] if _model_name(a) != name] + stored
            return predictions

        def gen_request(client, req_type, path, data=None, json_req=None, *args, **kwargs):
            if req_type.lower() == "post" and path == "/ml/metrics/publish":
                platform.metrics.extend(copy.deepcopy(json_req))
                return True, None
            platform.unexpected.append(f"{req_type.upper()} {path}")
            raise AssertionError(f"offline test: dtlpy tried to call the platform: {req_type.upper()} {path}")

        monkeypatch.setattr(repositories.Items, "_list", items_list)
        monkeypatch.setattr(repositories.Datasets, "_export_recursive", export_recursive)
        monkeypatch.setattr(repositories.Artifacts, "download", artifacts_download)
        monkeypatch.setattr(repositories.Artifacts, "upload", artifacts_upload)
        monkeypatch.setattr(repositories.Models, "update", models_update)
        monkeypatch.setattr(dl.BaseModelAdapter, "_upload_model_annotations", upload_model_annotations)
        monkeypatch.setattr(ApiClient, "gen_request", gen_request)


def _model_name(annotation: dict) -> str | None:
    return (((annotation.get("metadata") or {}).get("user") or {}).get("model") or {}).get("name")


def _matches(item: dict, clause: dict) -> bool:
    """Item DQL as the flows send it: $and/$or, dir, type, hidden, id ranges, metadata.system.tags.*."""
    for key, want in clause.items():
        if key in ("$and", "$or"):
            results = [_matches(item, sub) for sub in want]
            if not (all(results) if key == "$and" else any(results)):
                return False
        elif key == "id" and isinstance(want, dict):
            for op, bound in want.items():
                ok = {"$gte": item["id"] >= bound, "$lte": item["id"] <= bound, "$gt": item["id"] > bound, "$lt": item["id"] < bound}
                if op not in ok:
                    raise AssertionError(f"fake platform: id operator {op} not implemented")
                if not ok[op]:
                    return False
        elif key in ("dir", "type", "hidden", "id"):
            value = want.get("$eq", want) if isinstance(want, dict) else want
            if isinstance(value, dict):
                raise AssertionError(f"fake platform: filter {key}: {want} not implemented")
            if item.get(key) != value:
                return False
        elif key.startswith("metadata.system.tags."):
            if item["metadata"]["system"]["tags"].get(key.rsplit(".", 1)[1]) is not (want is True or want == {"$eq": True}):
                return False
        else:
            raise AssertionError(f"fake platform: item filter field {key!r} not implemented")
    return True


def _annotation_filter(filters):
    """The annotation filter prepare_data sends (type IN [...], metadata.system.model.name $exists False)."""
    if filters is None:
        return lambda ann: True
    types, no_models = None, False
    for single in filters.and_filter_list:
        if single.field == "type":
            types = set(single.values if isinstance(single.values, list) else [single.values])
        elif single.field == "metadata.system.model.name" and single.values is False:
            no_models = True
        else:
            raise AssertionError(f"fake platform: annotation filter {single.field} not implemented")

    def keep(ann: dict) -> bool:
        if types is not None and ann.get("type") not in types:
            return False
        return not (no_models and ((ann.get("metadata") or {}).get("system") or {}).get("model"))

    return keep
