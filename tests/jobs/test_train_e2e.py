"""One end-to-end ``jobs.train`` run through a real local Ray cluster with 2 workers, and a resume."""

import json
from pathlib import Path

import pytest
import torch

from jobs import train

CONFIG = str(Path(__file__).resolve().parents[2] / "jobs" / "configs" / "smoke_probe.yaml")


@pytest.mark.timeout(400)
def test_train_two_workers_then_resume(ray_cluster, tmp_path):
    common = [f"run.output_dir={tmp_path}", f"run.feature_store={tmp_path / 'cache'}", "scaling.num_workers=2"]
    metrics = train.main(["--config", CONFIG, *common, "train.epochs=2"])
    run_dir = tmp_path / "smoke-probe"
    for name in ("config.yaml", "split.json", "metrics.json", "report.md", "confusion.png", "curves.png",
                 "checkpoint/state.pt", "checkpoint/predictions.npz"):
        assert (run_dir / name).exists(), name
    assert metrics["test"]["top1"] > 0.3  # chance is 0.1: the pixel probe learns the gratings
    assert metrics["epochs"] == 2 and metrics["feature_cache"]["pixels"][0]["hit"] is False
    stored = json.loads((run_dir / "metrics.json").read_text())
    assert stored["test"]["top1"] == metrics["test"]["top1"]
    first_history = metrics["history"]

    # Same run, more epochs: resumes from the epoch-2 checkpoint instead of starting over,
    # and reads every feature from the cache.
    resumed = train.main(["--config", CONFIG, *common, "train.epochs=4"])
    assert resumed["epochs"] == 4
    assert resumed["history"][:2] == first_history
    assert all(entry["hit"] for entry in resumed["feature_cache"]["pixels"])
    state = torch.load(run_dir / "checkpoint" / "state.pt", weights_only=True)  # no pickle in checkpoints
    assert state["epoch"] == 4


def test_changed_config_refuses_to_resume(tmp_path):
    (tmp_path / "smoke-probe").mkdir()
    (tmp_path / "smoke-probe" / "config.yaml").write_text("name: smoke-probe\nmethod: {name: probe}\nseed: 99\n")
    with pytest.raises(SystemExit, match="different config"):
        train.main(["--config", CONFIG, f"run.output_dir={tmp_path}"])


def test_bad_config_fails_before_ray_starts(monkeypatch):
    def no_ray(*args, **kwargs):
        raise AssertionError("Ray was started for an invalid config")

    monkeypatch.setattr(train, "init_ray", no_ray)
    with pytest.raises(SystemExit, match=r"unknown key 'train\.lrr'"):
        train.main(["--config", CONFIG, "train.lrr=1"])
