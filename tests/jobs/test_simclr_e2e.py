"""SimCLR pretraining through ``jobs.train`` on a real local Ray cluster (2 DDP workers), tiny data."""

import json

import pytest
import torch
import yaml

from jobs import train
from polyclip.backbones import create_backbone

CONFIG = {
    "name": "smoke-simclr",
    "seed": 0,
    "data": {"dataset": "synthetic", "labels_per_class": 5, "val_per_class": 5, "test_limit": 60,
             "synthetic_size": 300, "unlabeled": 120},
    "backbone": {"spec": "random:small_cnn@4"},
    "method": {"name": "simclr", "projection_dim": 16, "temperature": 0.5},
    "train": {"epochs": 2, "batch_size": 16, "steps_per_epoch": 3, "optimizer": "lars", "lr": 0.3,
              "warmup_epochs": 1.0},
    "scaling": {"num_workers": 2},
    "run": {"encode_workers": 1, "max_failures": 0},
}


@pytest.mark.timeout(400)
def test_simclr_pretraining_job_exports_a_loadable_encoder(ray_cluster, tmp_path):
    path = tmp_path / "simclr.yaml"
    path.write_text(yaml.safe_dump(CONFIG))
    metrics = train.main(["--config", str(path), f"run.output_dir={tmp_path}", f"run.feature_store={tmp_path / 'c'}"])

    run_dir = tmp_path / "smoke-simclr"
    for name in ("metrics.json", "report.md", "classification_report.txt", "checkpoint/backbone/backbone.json"):
        assert (run_dir / name).exists(), name
    history = metrics["history"]
    assert len(history) == 2 and all(0 < h["train_ntxent"] < 10 for h in history)
    assert 0.0 <= metrics["test"]["top1"] <= 1.0 and metrics["test"]["n"] == 60  # the online probe's accuracy

    encoder = create_backbone(f"checkpoint:{run_dir / 'checkpoint'}")
    meta = json.loads((run_dir / "checkpoint" / "backbone" / "backbone.json").read_text())
    assert meta["arch_spec"] == "random:small_cnn@4" and encoder.num_features == 16
    # The exported encoder is the trained one, not the initial weights.
    torch.manual_seed(0)
    initial = create_backbone("random:small_cnn@4")
    trained = torch.load(run_dir / "checkpoint" / "backbone" / "backbone.pt", weights_only=True)
    assert any(not torch.equal(trained[k], v) for k, v in initial.encoder.state_dict().items()
               if v.dtype.is_floating_point)
    images = torch.zeros(2, 1, 28, 28, dtype=torch.uint8)
    assert encoder.encode(images).shape == (2, 16)
