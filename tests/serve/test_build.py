"""What ``build_app`` asks Serve for, without starting Ray: resources, queues, autoscaling, no key."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pytest
import yaml

from polyclip.ensemble import BackboneInfo, fit_ensemble, save_ensemble
from serve.app import AppArgs, SafeJSONResponse, _internal_error, build_app, safe_text
from serve.deployments import encoder_options
from serve.encoder import autocast_dtype, replica_device

ROOT = Path(__file__).resolve().parents[2]
LITE = ["efficientnet_lite:0", "efficientnet_lite:1", "efficientnet_lite:2"]


@pytest.fixture(scope="module")
def artifact(tmp_path_factory) -> str:
    """A three-member artifact named like the demo's (heads fitted on random features; never encoded)."""
    rng = np.random.default_rng(0)
    train = {name: rng.normal(size=(12, 8)).astype(np.float32) for name in LITE}
    infos = {name: BackboneInfo(name, name, 8, 32, {"image_size": 32, "mean": [0.5] * 3, "std": [0.5] * 3,
                                                    "in_chans": 3}) for name in LITE}
    ensemble, _ = fit_ensemble(train, np.repeat(np.arange(3), 4), class_names=["a", "b", "c"], backbones=infos,
                               steps=5, seed=0)
    return str(save_ensemble(tmp_path_factory.mktemp("build") / "ensemble", ensemble))


def _deployments(app) -> list:
    ingress = app._bound_deployment
    encoders = ingress.init_args[1] or {}
    return [ingress] + [enc._bound_deployment for enc in encoders.values()]


def _cpus(app) -> float:
    return sum(d.ray_actor_options.get("num_cpus", 1) * (d.num_replicas or 1) for d in _deployments(app))


@pytest.mark.parametrize("mode", ["per_backbone", "single"])
def test_defaults_fit_a_two_core_machine_with_room_to_spare(artifact, mode):
    app = build_app({"artifact": artifact, "deployment_mode": mode})
    assert _cpus(app) <= 1.0, [(d.name, d.ray_actor_options) for d in _deployments(app)]
    assert all(d.ray_actor_options.get("num_gpus", 0) == 0 for d in _deployments(app))


def test_shipped_serve_config_fits_two_cores_and_is_a_valid_serve_config(artifact):
    from ray.serve.schema import ServeDeploySchema

    config = yaml.safe_load((ROOT / "serve" / "config.yaml").read_text())
    ServeDeploySchema.model_validate(config)
    args = dict(config["applications"][0]["args"], artifact=artifact)
    assert config["http_options"]["host"] == "127.0.0.1" and args["allow_unauthenticated"] is False
    assert _cpus(build_app(args)) <= 1.0
    assert "runtime_env" not in config["applications"][0] or "env_vars" not in config["applications"][0][
        "runtime_env"]


def test_ingress_and_encoders_have_bounded_queues_and_retry_after(artifact):
    app = build_app({"artifact": artifact, "max_ongoing_requests": 16, "max_queued_requests": 40,
                     "retry_after_s": 2})
    ingress, *encoders = _deployments(app)
    assert ingress.max_ongoing_requests == 16 and ingress.max_queued_requests == 40
    assert ingress.backpressure_config.status_code == 503 and ingress.backpressure_config.retry_after_s == 2
    assert all(e.max_queued_requests > 0 and e.max_ongoing_requests > 0 for e in encoders)


def test_the_key_never_enters_the_app_built(artifact, monkeypatch, tmp_path):
    monkeypatch.setenv("POLYCLIP_API_KEY", "key-that-must-stay-in-the-environment")
    app = build_app({"artifact": artifact})
    for deployment in _deployments(app):
        assert "runtime_env" not in deployment.ray_actor_options
        assert "key-that-must" not in repr(deployment.init_args) + repr(deployment.ray_actor_options)


def test_autoscaling_config_replaces_num_replicas_and_bad_keys_are_named(artifact):
    info = BackboneInfo(LITE[2], LITE[2], 8, 32)
    args = AppArgs(artifact=artifact, autoscaling_config={"min_replicas": 1, "max_replicas": 3,
                                                          "target_ongoing_requests": 4})
    options = encoder_options(args, info, LITE)
    assert "num_replicas" not in options
    assert options["autoscaling_config"]["max_replicas"] == 3
    app = build_app(args)
    encoder = _deployments(app)[1]
    assert encoder._deployment_config.autoscaling_config.max_replicas == 3
    with pytest.raises(ValueError, match="max_replica"):
        build_app(AppArgs(artifact=artifact, autoscaling_config={"max_replica": 3}))


def test_per_backbone_settings_and_their_errors(artifact):
    args = AppArgs(artifact=artifact, num_gpus={LITE[2]: 1.0}, num_cpus={LITE[0]: 0.5}, num_replicas={LITE[1]: 2})
    options = {name: encoder_options(args, BackboneInfo(name, name, 8, 32), LITE) for name in LITE}
    assert options[LITE[2]]["ray_actor_options"] == {"num_cpus": 0.25, "num_gpus": 1.0}
    assert options[LITE[0]]["ray_actor_options"]["num_cpus"] == 0.5 and options[LITE[1]]["num_replicas"] == 2
    with pytest.raises(ValueError, match=r"num_gpus: unknown backbones \['lite9'\]"):
        build_app(AppArgs(artifact=artifact, num_gpus={"lite9": 1}))
    with pytest.raises(ValueError, match="decode_budget_pixels=10 is below max_pixels"):
        AppArgs(artifact=artifact, decode_budget_pixels=10)
    with pytest.raises(ValueError, match="num_gpus must be one number"):
        AppArgs(artifact=artifact, deployment_mode="single", num_gpus={LITE[0]: 1})


def test_cuda_only_with_a_reserved_gpu():
    import torch

    assert replica_device([]).type == "cpu"  # a visible GPU that Ray did not reserve is not ours
    assert replica_device(["0"]).type == ("cuda" if torch.cuda.is_available() else "cpu")
    assert replica_device().type == "cpu"  # outside Ray nothing is reserved
    assert autocast_dtype(torch.device("cpu"), "bf16") is None
    assert autocast_dtype(torch.device("cuda"), "fp32") is None
    assert autocast_dtype(torch.device("cuda"), "fp16") is torch.float16


def test_responses_always_render_and_unexpected_errors_are_json_500s(caplog):
    assert safe_text("Dress\ud800") == "Dress\\ud800" and safe_text("Dress") == "Dress"
    body = SafeJSONResponse({"labels": ["T\ud800"]}).body
    assert json.loads(body.decode("utf-8")) == {"labels": ["T\ud800"]}  # valid UTF-8 on the wire
    with pytest.raises(ValueError):
        SafeJSONResponse({"p": float("nan")})  # raised inside the route's try: becomes a JSON 500
    with caplog.at_level(logging.ERROR, logger="ray.serve"):
        response = _internal_error(RuntimeError("boom"), "req-123", "/v1/classify")
    assert response.status_code == 500
    assert json.loads(response.body) == {"error": "internal_error", "request_id": "req-123",
                                         "detail": "unexpected error; it was logged under this request_id"}
    assert "req-123" in caplog.text and "boom" in caplog.text


def test_serve_run_passes_mappings_as_json_text(artifact):
    args = AppArgs.model_validate({"artifact": artifact, "num_gpus": '{"efficientnet_lite:2": 1}',
                                   "autoscaling_config": '{"min_replicas": 1, "max_replicas": 2}', "num_cpus": "0.5"})
    assert args.num_gpus == {"efficientnet_lite:2": 1} and args.autoscaling_config == {"min_replicas": 1,
                                                                                       "max_replicas": 2}
    assert args.num_cpus == 0.5
    with pytest.raises(ValueError, match="not a JSON object"):
        AppArgs.model_validate({"artifact": artifact, "num_gpus": "{lite: 1"})
