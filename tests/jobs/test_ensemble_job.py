"""``jobs.ensemble``: config validation without Ray, and one end-to-end run on synthetic data."""

import json
from pathlib import Path

import pytest

from jobs import ensemble as ensemble_job
from jobs.config import ConfigError
from polyclip.ensemble import CascadePoint, choose_threshold, load_ensemble

CONFIG_DIR = Path(__file__).resolve().parents[2] / "jobs" / "configs" / "ensemble"
SHIPPED = sorted(CONFIG_DIR.glob("*.yaml"))

TINY = {
    "name": "tiny-ensemble",
    "seed": 0,
    "data": {"dataset": "synthetic", "synthetic_size": 300, "labels_per_class": 4, "val_per_class": 5,
             "test_limit": 100},
    "backbones": [{"spec": "pixels"}, {"spec": "random:small_cnn@8"}],
    "combiner": {"steps": 60},
    "cascade": {"thresholds": [0.0, 0.5, 0.9, 1.01]},
    "run": {"encode_workers": 1},
}


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: p.name)
def test_shipped_ensemble_configs_validate(path):
    cfg = ensemble_job.load_ensemble_config(path)
    assert cfg.name and len(cfg.backbones) == 3
    assert [b.spec for b in cfg.backbones] == ["efficientnet_lite:0", "efficientnet_lite:1", "efficientnet_lite:2"]


def test_bad_keys_and_values_are_named():
    with pytest.raises(ConfigError, match=r"unknown key 'combiner.hiden'"):
        ensemble_job.parse_ensemble_config({**TINY, "combiner": {"hiden": 3}})
    with pytest.raises(ConfigError, match=r"combiner.combine.*'add'"):
        ensemble_job.parse_ensemble_config({**TINY, "combiner": {"combine": "add"}})
    with pytest.raises(ConfigError, match="unknown backbone spec"):
        ensemble_job.parse_ensemble_config({**TINY, "backbones": [{"spec": "resnet"}]})
    with pytest.raises(ConfigError, match=r"appear twice"):
        ensemble_job.parse_ensemble_config({**TINY, "backbones": [{"spec": "pixels"}, {"spec": "pixels"}]})
    with pytest.raises(ConfigError, match=r"backbones"):
        ensemble_job.parse_ensemble_config({**TINY, "backbones": []})


def test_protocol_and_cascade_keys_keep_their_names_into_the_library():
    import dataclasses

    from polyclip.ensemble import CascadeOptions, ProtocolOptions

    for section, options in ((ensemble_job.ProtocolConfig, ProtocolOptions),
                             (ensemble_job.CascadeConfig, CascadeOptions)):
        library_defaults = {k: list(v) if isinstance(v, tuple) else v
                            for k, v in dataclasses.asdict(options()).items()}
        assert library_defaults == section().model_dump()  # same keys, same defaults


def test_bad_config_fails_before_ray_starts(monkeypatch):
    def no_ray(*args, **kwargs):
        raise AssertionError("Ray was started for an invalid config")

    monkeypatch.setattr(ensemble_job, "init_ray", no_ray)
    with pytest.raises(SystemExit, match=r"protocol\.name"):
        ensemble_job.main(["--config", str(SHIPPED[0]), "protocol.name=magic"])


@pytest.mark.timeout(300)
def test_ensemble_job_end_to_end(ray_cluster, tmp_path):
    import torch
    import yaml

    from polyclip.backbones import create_backbone, save_backbone

    # A saved random CNN: every encoder actor (and serving) rebuilds the same weights.
    torch.manual_seed(0)
    save_backbone(create_backbone("random:small_cnn@8"), tmp_path / "cnn")
    config = tmp_path / "tiny.yaml"
    config.write_text(yaml.safe_dump({**TINY, "backbones": [{"spec": "pixels"},
                                                           {"spec": f"checkpoint:{tmp_path / 'cnn'}", "name": "cnn"}]}))
    metrics = ensemble_job.main(["--config", str(config), f"run.output_dir={tmp_path}",
                                 f"run.feature_store={tmp_path / 'cache'}"])
    run_dir = tmp_path / "tiny-ensemble"
    for name in ("config.yaml", "split.json", "metrics.json", "ensemble.md", "ensemble_accuracy.png", "cascade.png",
                 "ensemble/ensemble.json", "ensemble/heads.safetensors", "ensemble/combiner.safetensors"):
        assert (run_dir / name).exists(), name
    acc = metrics["evaluation"]["accuracy"]
    assert set(acc) >= {"adaptive", "logit_average", "probability_average", "oracle", "single:pixels",
                        "single:cnn"}
    assert acc["single:pixels"] > 0.3  # chance 0.1: a pixel probe learns the gratings
    assert acc["oracle"] >= max(acc["single:pixels"], acc["single:cnn"])
    assert metrics["protocol"] == "split" and metrics["n_combiner_labels"] == 10  # 1 of 4 per class
    assert metrics["val_evaluation"]["n"] == 50
    curve = metrics["cascade"]["curve"]
    assert [p["threshold"] for p in curve] == [0.0, 0.5, 0.9, 1.01]
    assert curve[0]["mean_calls"] == 1.0 and curve[-1]["mean_calls"] == 2.0
    assert json.loads((run_dir / "metrics.json").read_text())["test"]["top1"] == acc["adaptive"]

    loaded = load_ensemble(run_dir / "ensemble")
    assert loaded.backbone_names == ["pixels", "cnn"] and loaded.backbone_specs[1].startswith("checkpoint:")
    assert loaded.backbones[1].preprocessing["image_size"] == 28
    assert loaded.metadata["protocol"] == "split" and "cascade_chosen" in loaded.metadata
    # The served threshold is the one the validation curve picks; the test curve is only reported.
    cascade = metrics["cascade"]
    val_curve = [CascadePoint(**p) for p in cascade["val_curve"]]
    picked = choose_threshold(val_curve, 0.005, reference_accuracy=metrics["val_evaluation"]["accuracy"]["adaptive"])
    assert cascade["selected_on"] == "validation" and cascade["chosen"] == picked.to_dict()
    assert loaded.metadata["cascade_chosen"]["threshold"] == picked.threshold
    assert loaded.metadata["cascade_chosen"]["selected_on"] == "validation"
    assert cascade["chosen_test"] == next(p for p in curve if p["threshold"] == picked.threshold)
    assert metrics["feature_cache"]["pixels"][0]["hit"] is False
