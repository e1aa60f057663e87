"""A Dataloop app folder, read without dtlpy: ``dataloop.json``, its models, and the Serve settings they map to.

The folder is laid out as Dataloop publishes an app: ``dataloop.json``, the
module its ``components.modules[].entryPoint`` names, and the model's
artifacts, in ``artifacts/<model name>/``, ``artifacts/`` or beside them.
Each ``components.models[]`` entry is one servable model; its module names the
adapter class and a compute config (the ``predict_items`` function's own
``computeConfig`` wins over the module's, as on the platform).

A compute config becomes Serve settings (:func:`replica_plan`):

- ``podType`` -> the replica's CPUs, memory and GPUs (Dataloop's pod table,
  :data:`POD_TYPES`), capped to the cluster this runs on;
- ``autoscaler.minReplicas/maxReplicas`` -> ``min_replicas/max_replicas``, and
  ``queueLength`` -> ``target_ongoing_requests``;
- ``concurrency`` -> how many ``predict`` calls one replica may run at once.

docs/adapters.md says how each maps and why. Nothing here imports dtlpy: the
CLI and the Serve config builder read a folder before any replica starts.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path

MANIFEST_FILE = "dataloop.json"
GIB = 1024**3


class AppError(ValueError):
    """A folder that cannot be served as a Dataloop app; the message names the file and what to fix."""


@dataclass(frozen=True)
class PodType:
    name: str
    cpus: float
    memory_gib: float
    gpus: int = 0
    gpu: str | None = None


#: Dataloop's pod types, as its custom model adapter tutorial lists them (vCPU, memory GiB, GPU).
POD_TYPES: dict[str, PodType] = {
    pod.name: pod
    for pod in (
        PodType("regular-xs", 0.5, 1.7),
        PodType("regular-s", 1, 3.5),
        PodType("regular-m", 2, 7),
        PodType("regular-l", 4, 14),
        PodType("gpu-k80", 4, 26, 1, "K80"),
        PodType("gpu-t4", 4, 14, 1, "T4"),
        PodType("gpu-v100", 6, 26, 1, "V100"),
        PodType("gpu-a100", 12, 85, 1, "A100"),
    )
}
#: The platform's pod when a compute config names none.
DEFAULT_POD_TYPE = "regular-s"
#: Below this share of a core per replica, fewer replicas: each still gets this much (see replica_plan).
MIN_REPLICA_CPUS = 0.5


@dataclass(frozen=True)
class Autoscaler:
    """A compute config's ``runtime.autoscaler`` (Dataloop's defaults where it says nothing)."""

    min_replicas: int = 0
    max_replicas: int = 1
    queue_length: int = 10
    type: str = "rabbitmq"


@dataclass(frozen=True)
class AppModel:
    """One ``components.models[]`` entry, with its module and compute config resolved."""

    name: str
    entry: dict  # the manifest's own entry: the model entity is built from it
    entry_point: Path  # the adapter's module (absolute)
    class_name: str
    artifacts: Path  # the folder ``load(local_path)`` gets
    pod_type: str
    concurrency: int
    autoscaler: Autoscaler
    compute_config: str | None = None

    @property
    def configuration(self) -> dict:
        return dict(self.entry.get("configuration") or {})

    @property
    def labels(self) -> list[str]:
        return list(self.entry.get("labels") or self.configuration.get("labels") or [])

    @property
    def weights_filename(self) -> str | None:
        name = self.configuration.get("weights_filename")
        return str(name) if name else None


@dataclass(frozen=True)
class AdapterApp:
    """A Dataloop app folder and its models, in manifest order."""

    folder: Path
    name: str
    models: dict[str, AppModel] = field(default_factory=dict)

    def model(self, name: str | None = None) -> AppModel:
        """The model called ``name``; with no name, the manifest's only model."""
        if name is None:
            if len(self.models) != 1:
                raise AppError(f"{self.folder / MANIFEST_FILE} has {len(self.models)} models ({', '.join(self.models)}): name one with --model")
            return next(iter(self.models.values()))
        if name not in self.models:
            raise AppError(f"{self.folder / MANIFEST_FILE} has no model {name!r}; its models: {', '.join(self.models) or 'none'}")
        return self.models[name]


def read_app(folder: str | Path) -> AdapterApp:
    """Read and check an app folder's ``dataloop.json``; :class:`AppError` names what is wrong."""
    folder = Path(folder).expanduser().resolve()
    path = folder / MANIFEST_FILE
    if not path.is_file():
        raise AppError(f"{path} not found: an adapter folder holds dataloop.json, the adapter module and the model's artifacts")
    try:
        manifest = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise AppError(f"{path} is not valid JSON: {exc}") from None
    components = manifest.get("components") if isinstance(manifest, dict) else None
    if not isinstance(components, dict):
        raise AppError(f"{path} has no 'components' object (modules, models, computeConfigs)")
    modules = {m.get("name"): m for m in components.get("modules") or [] if isinstance(m, dict)}
    configs = {c.get("name"): c for c in components.get("computeConfigs") or [] if isinstance(c, dict)}
    models: dict[str, AppModel] = {}
    for entry in components.get("models") or []:
        name = entry.get("name") if isinstance(entry, dict) else None
        if not name:
            raise AppError(f"{path}: a components.models[] entry has no name")
        module = modules.get(entry.get("moduleName")) or (next(iter(modules.values())) if len(modules) == 1 and not entry.get("moduleName") else None)
        if module is None:
            raise AppError(f"{path}: model {name!r} names module {entry.get('moduleName')!r}, which components.modules does not define")
        entry_point = folder / str(module.get("entryPoint") or "")
        if not module.get("entryPoint") or not entry_point.is_file():
            raise AppError(f"{path}: module {module.get('name')!r} has entryPoint {module.get('entryPoint')!r}, which is not a file in {folder}")
        if not module.get("className"):
            raise AppError(f"{path}: module {module.get('name')!r} has no className (the adapter class in {entry_point.name})")
        config_name = _predict_compute_config(module)
        config = configs.get(config_name, {}) if config_name else {}
        if config_name and not config:
            raise AppError(f"{path}: module {module.get('name')!r} uses computeConfig {config_name!r}, which components.computeConfigs does not define")
        runtime = config.get("runtime") or {}
        scaler = runtime.get("autoscaler") or {}
        models[name] = AppModel(
            name=name,
            entry=entry,
            entry_point=entry_point,
            class_name=str(module["className"]),
            artifacts=_artifacts(folder, name),
            pod_type=str(runtime.get("podType") or DEFAULT_POD_TYPE),
            concurrency=max(1, int(runtime.get("concurrency") or 1)),
            autoscaler=Autoscaler(
                min_replicas=max(0, int(scaler.get("minReplicas", Autoscaler.min_replicas))),
                max_replicas=max(1, int(scaler.get("maxReplicas", Autoscaler.max_replicas))),
                queue_length=max(1, int(scaler.get("queueLength", Autoscaler.queue_length))),
                type=str(scaler.get("type", Autoscaler.type)),
            ),
            compute_config=config_name,
        )
    if not models:
        raise AppError(f"{path} declares no components.models: nothing to serve")
    return AdapterApp(folder=folder, name=str(manifest.get("name") or folder.name), models=models)


def _predict_compute_config(module: dict) -> str | None:
    for function in module.get("functions") or []:
        if isinstance(function, dict) and function.get("name") == "predict_items" and function.get("computeConfig"):
            return str(function["computeConfig"])
    return module.get("computeConfig")


def _artifacts(folder: Path, model: str) -> Path:
    for candidate in (folder / "artifacts" / model, folder / "artifacts"):
        if candidate.is_dir():
            return candidate
    return folder


#: The figures of ``detserve export --adapter``'s check against the adapter, in the export folder.
PARITY_FILE = "adapter-parity.json"


def accelerated_problem(export: Path) -> str | None:
    """Why an adapter's export cannot be served in its place (missing, or its boxes differ from the adapter's), or None."""
    figures = export / PARITY_FILE
    if not (export / "manifest.json").is_file() or not figures.is_file():
        return f"no accelerated export checked against the adapter at {export}: run `detserve export --adapter` first"
    parity = json.loads(figures.read_text())
    if not parity.get("passed"):
        return (f"the export at {export} gives the adapter's boxes for {parity.get('matched_share', 0):.1%} of them, below its "
                f"threshold {parity.get('threshold')} ({figures} lists which differ and why): serve the adapter as written")
    return None


def export_folder(app: AdapterApp, model: AppModel) -> Path:
    """Where ``detserve export --adapter`` writes a model's accelerated export by default, and ``--accelerated`` finds it."""
    return app.folder / "detserve-export" / model.name


# ---- Serve settings ------------------------------------------------------------------


@dataclass(frozen=True)
class ClusterSize:
    """What the Ray cluster offers the applications being planned (CPUs, memory in bytes, GPUs)."""

    cpus: float
    memory_bytes: float
    gpus: float = 0.0


@dataclass(frozen=True)
class ReplicaPlan:
    """A model's Serve settings from its compute config, capped to the cluster; ``note`` says what was capped."""

    model: str
    pod: PodType
    num_cpus: float
    memory_bytes: int
    num_gpus: float
    min_replicas: int
    initial_replicas: int
    max_replicas: int
    target_ongoing_requests: int
    predict_threads: int
    note: str | None = None

    def deployment_options(self) -> dict:
        """The deployment's ``ray_actor_options`` and ``autoscaling_config`` (deploy.yaml's ``deployments:`` keys)."""
        actor: dict = {"num_cpus": self.num_cpus}
        if self.memory_bytes:
            actor["memory"] = self.memory_bytes
        if self.num_gpus:
            actor["num_gpus"] = self.num_gpus
        return {
            "ray_actor_options": actor,
            "autoscaling_config": {
                "min_replicas": self.min_replicas,
                "initial_replicas": self.initial_replicas,
                "max_replicas": self.max_replicas,
                "target_ongoing_requests": self.target_ongoing_requests,
                "upscale_delay_s": 5,
                "downscale_delay_s": 60,
            },
        }


def replica_plan(model: AppModel, cluster: ClusterSize, apps_sharing: int = 1) -> ReplicaPlan:
    """The Serve settings of ``model``'s compute config on ``cluster`` (shared equally by ``apps_sharing`` applications).

    - Replicas: ``initial_replicas`` is at least 1, so that the adapter's ``load`` runs (and can fail) at
      start; ``minReplicas: 0`` still lets Serve scale to zero when idle.
    - Resources: a replica gets its pod's CPUs, memory and GPUs when all ``max_replicas`` of them fit this
      application's share of the cluster; otherwise each gets ``share / max_replicas``, but at least
      ``MIN_REPLICA_CPUS`` of a core, and ``max_replicas`` drops until that fits. The replica count is kept
      before the pod size because a replica runs ``concurrency`` predict calls at most (adapters are not
      assumed thread-safe): replicas are an adapter's parallelism.
    - A pod with a GPU on a cluster without one asks for none: the adapter's own code picks its device.
    """
    pod = POD_TYPES.get(model.pod_type)
    unknown = pod is None
    if pod is None:
        pod = POD_TYPES[DEFAULT_POD_TYPE]
    share = max(1, apps_sharing)
    cpus, memory, gpus = cluster.cpus / share, cluster.memory_bytes / share, cluster.gpus / share
    scaler = model.autoscaler
    initial = max(1, min(scaler.min_replicas, scaler.max_replicas))
    wanted = max(scaler.max_replicas, initial)
    replicas = wanted
    per_cpu = min(pod.cpus, cpus / replicas)
    if per_cpu < MIN_REPLICA_CPUS:
        replicas = max(1, math.floor(cpus / min(pod.cpus, MIN_REPLICA_CPUS)))
        per_cpu = min(pod.cpus, cpus / replicas)
    initial = min(initial, replicas)
    per_memory = int(min(pod.memory_gib * GIB, memory / replicas)) if memory > 0 else 0
    per_gpu = min(float(pod.gpus), gpus / replicas) if pod.gpus else 0.0
    capped = (
        unknown
        or replicas < wanted
        or per_cpu < pod.cpus
        or (memory > 0 and per_memory < pod.memory_gib * GIB)
        or (pod.gpus and per_gpu < pod.gpus)
    )
    note = None
    if capped:
        asked = f"{model.pod_type!r} is not one of Dataloop's pod types ({', '.join(POD_TYPES)}); planned as {pod.name}: " if unknown else ""
        gpu_part = f", {pod.gpus} {pod.gpu} GPU" if pod.gpus else ""
        have_gpu = f", {cluster.gpus:g} GPU(s)" if pod.gpus else ""
        shared = f" ({share} apps share it)" if share > 1 else ""
        got_gpu = ""
        if pod.gpus:
            got_gpu = f", {per_gpu:g} GPU" if per_gpu else ", no GPU (the adapter picks its own device: CPU here)"
        note = (
            f"adapter {model.name}: {asked}{pod.name} asks {pod.cpus:g} vCPU, {pod.memory_gib:g} GiB{gpu_part} per replica, "
            f"up to {wanted} replica(s); this cluster has {cluster.cpus:g} CPUs, {cluster.memory_bytes / GIB:.1f} GiB{have_gpu}{shared}: "
            f"capped to {replicas} replica(s) of {per_cpu:g} CPU, {per_memory / GIB:.1f} GiB{got_gpu}"
        )
    return ReplicaPlan(
        model=model.name,
        pod=pod,
        num_cpus=round(per_cpu, 3),
        memory_bytes=per_memory,
        num_gpus=round(per_gpu, 3),
        min_replicas=min(scaler.min_replicas, replicas),
        initial_replicas=initial,
        max_replicas=replicas,
        target_ongoing_requests=scaler.queue_length,
        predict_threads=model.concurrency,
        note=note,
    )
