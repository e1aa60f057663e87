"""deploy.yaml and the KubeRay RayService are valid Serve configs that build detserve apps."""

from __future__ import annotations


import pytest
import yaml
from ray.serve.schema import ServeDeploySchema

from detserve.serve.app import AppArgs, UserConfig
from tests.conftest import ROOT


def configs():
    deploy = ServeDeploySchema.model_validate(yaml.safe_load((ROOT / "deploy.yaml").read_text()))
    service = yaml.safe_load((ROOT / "serve" / "kuberay" / "rayservice-gpu.yaml").read_text())
    kuberay = ServeDeploySchema.model_validate(yaml.safe_load(service["spec"]["serveConfigV2"]))
    return deploy, kuberay


@pytest.mark.parametrize("which", [0, 1])
def test_every_app_is_a_detserve_app_with_valid_args_and_batching(which):
    config = configs()[which]
    assert {a.name for a in config.applications} == {"yolo", "fasterrcnn"}
    for app in config.applications:
        assert app.import_path == "detserve.serve.app:build_app" and app.route_prefix == f"/{app.name}"
        AppArgs(**app.args)  # extra="forbid": a typo in args fails here, not in a replica
        [deployment] = app.deployments
        user = UserConfig(**deployment.user_config)
        # Requests must reach the replica to be admitted by deadline: far more may be in flight than one batch.
        assert deployment.max_ongoing_requests >= 16 * user.max_batch_size
        # Every request admission may hold, and as many arriving: none waits in Ray's FIFO queue, outside the scheduler.
        assert deployment.max_ongoing_requests >= 2 * AppArgs(**app.args).max_queued_images
        assert deployment.max_queued_requests > 0
        # The replica's deadline is the proxy's timeout, so its JSON 408/503 always comes first.
        assert AppArgs(**app.args).request_timeout_s == config.http_options.request_timeout_s
        assert app.runtime_env["env_vars"]["RAY_USAGE_STATS_ENABLED"] == "0"


def test_laptop_config_binds_loopback_and_gpu_config_asks_for_gpus():
    deploy, kuberay = configs()
    assert deploy.http_options.host == "127.0.0.1"
    for app in kuberay.applications:
        assert app.deployments[0].ray_actor_options.num_gpus == 1
        assert app.args["backend"] == "tensorrt"


def test_build_app_has_the_signature_rays_config_loader_calls():
    """`serve run deploy.yaml` calls the builder with exactly one argument (Ray refuses other signatures)."""
    import inspect

    from detserve.serve.app import build_app

    assert len(inspect.signature(build_app).parameters) == 1
    app = build_app({"model": "yolo"})
    assert type(app).__name__ == "Application"


def test_every_replica_autoscaling_asks_for_can_be_placed_on_two_cores():
    from detserve.serve.run import placement_problems

    deploy, _ = configs()
    assert placement_problems(deploy, cpus=2) == []
    assert max(a.deployments[0].autoscaling_config["max_replicas"] for a in deploy.applications) >= 2
    # ... and the check does find a config that cannot be placed
    problems = placement_problems(deploy, cpus=1)
    assert problems and "max_replicas" in problems[-1]


def test_the_adapter_config_builds_adapter_apps_with_valid_args():
    """deploy-adapter.yaml: every app is an adapter app whose args name a folder and one of its models."""
    from detserve.adapters.dataloop_app import read_app
    from detserve.serve.app import AdapterArgs, build_adapter_app

    config = ServeDeploySchema.model_validate(yaml.safe_load((ROOT / "deploy-adapter.yaml").read_text()))
    assert {a.name for a in config.applications} == {"yolo20n", "fasterrcnn-shapes"}
    for app in config.applications:
        assert app.import_path == "detserve.serve.app:build_adapter_app" and app.route_prefix == f"/{app.name}"
        args = AdapterArgs(**app.args)
        assert read_app(ROOT / args.adapter).model(args.model).name == app.name
        assert app.runtime_env["env_vars"]["YOLO_OFFLINE"] == "1"
    built = build_adapter_app({"adapter": str(ROOT / "adapters/apps/examples/yolo-tutorial")})
    assert type(built).__name__ == "Application"
