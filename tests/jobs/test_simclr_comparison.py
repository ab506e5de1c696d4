"""The SimCLR comparison's config and encoder freezing (no Ray: the grid's jobs are ``jobs.train`` runs)."""

from pathlib import Path

import pytest
import torch
import yaml

from jobs.config import ConfigError
from jobs.simclr_comparison import SIMCLR, freeze_encoder, job_overrides, load_comparison, random_encoder
from polyclip.backbones import create_backbone, save_backbone

SHIPPED = Path(__file__).resolve().parents[2] / "jobs" / "configs" / "simclr" / "comparison.yaml"


def test_shipped_comparison_validates_with_every_cell():
    comparison, pretrain = load_comparison(SHIPPED, ["data.test_limit=100"])
    assert pretrain.method.name == "simclr" and pretrain.data.test_limit == 100
    assert pretrain.run.output_dir == "runs/simclr-comparison"
    assert comparison.labels_per_class == [10, -1] and set(comparison.modes) == {"finetune", "probe"}
    assert [b.spec for b in comparison.backbones][:2] == [SIMCLR, "random"]
    lite = comparison.backbones[2]
    cfg = job_overrides(comparison, lite, "finetune", -1, lite.spec)
    assert cfg.name == "efficientnet-lite0-finetune-all" and cfg.method.name == "finetune"
    assert cfg.train.scheduler == "plateau" and cfg.train.optimizer == "adam"
    assert cfg.backbone.image_size == 112 and cfg.data.labels_per_class == -1 and cfg.data.test_limit == 100
    probe = job_overrides(comparison, comparison.backbones[0], "probe", 10, "checkpoint:/x")
    assert probe.method.name == "probe" and probe.backbone.spec == "checkpoint:/x"


def _write(tmp_path: Path, **changes: object) -> Path:
    data = yaml.safe_load(SHIPPED.read_text())
    data.update(changes)
    data["runs"] = {k: str(SHIPPED.parent / v) for k, v in data["runs"].items()}
    path = tmp_path / "comparison.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def test_bad_comparison_keys_and_values_are_named(tmp_path):
    with pytest.raises(ConfigError, match="labels_per_class values must be >= 1 or -1, got \\[0\\]"):
        load_comparison(_write(tmp_path, labels_per_class=[10, 0]))
    with pytest.raises(ConfigError, match="backbone"):
        load_comparison(_write(tmp_path, backbonez=[]))
    with pytest.raises(ConfigError, match=r"must have method\.name simclr, got 'probe'"):
        load_comparison(_write(tmp_path, runs={"pretrain": "probe_fmnist.yaml", "probe": "probe_fmnist.yaml",
                                               "finetune": "finetune_fmnist.yaml"}))
    with pytest.raises(ConfigError, match="does not exist"):
        load_comparison(tmp_path / "missing.yaml")


def test_cell_overrides_apply_to_their_cells_only(tmp_path):
    cells = [{"mode": "finetune", "labels_per_class": -1, "overrides": ["train.epochs=2"]},
             {"mode": "probe", "overrides": ["train.lr=0.05"]}]
    path = _write(tmp_path, cell_overrides=cells)
    comparison, _ = load_comparison(path)
    entry = comparison.backbones[0]
    assert job_overrides(comparison, entry, "finetune", -1, "checkpoint:/x").train.epochs == 2
    assert job_overrides(comparison, entry, "finetune", 10, "checkpoint:/x").train.epochs == 30
    assert {job_overrides(comparison, entry, "probe", k, "checkpoint:/x").train.lr for k in (10, -1)} == {0.05}
    with pytest.raises(ConfigError, match=r"train\.epochz"):
        load_comparison(_write(tmp_path, cell_overrides=[{"mode": "finetune", "labels_per_class": -1,
                                                          "overrides": ["train.epochz=2"]}]))


def test_frozen_encoders_are_content_addressed(tmp_path):
    torch.manual_seed(0)
    save_backbone(create_backbone("random:small_cnn@4"), tmp_path / "a")
    torch.manual_seed(1)
    save_backbone(create_backbone("random:small_cnn@4"), tmp_path / "b")
    spec_a = freeze_encoder(tmp_path / "a", tmp_path / "enc", "simclr")
    spec_b = freeze_encoder(tmp_path / "b", tmp_path / "enc", "simclr")
    assert spec_a != spec_b and spec_a == freeze_encoder(tmp_path / "a", tmp_path / "enc", "simclr")
    torch.testing.assert_close(create_backbone(spec_a).encoder.state_dict(),
                               create_backbone(f"checkpoint:{tmp_path / 'a'}").encoder.state_dict())
    # The random-init baseline: same architecture and preprocessing, seeded weights.
    random = create_backbone(f"checkpoint:{random_encoder(tmp_path / 'a', 0, tmp_path / 'enc')}")
    assert random.num_features == 16 and random.preprocessing.in_chans == 1
    torch.testing.assert_close(random.encoder.state_dict(), create_backbone(spec_a).encoder.state_dict())


def test_cpu_comparison_validates_and_shortens_only_the_all_labels_fine_tuning():
    comparison, _ = load_comparison(SHIPPED.with_name("comparison_cpu.yaml"))
    assert comparison.encoder and [b.spec for b in comparison.backbones][:2] == [SIMCLR, "random"]
    lite = comparison.backbones[2]
    assert job_overrides(comparison, lite, "finetune", -1, lite.spec).train.epochs == 2
    assert job_overrides(comparison, lite, "finetune", 10, lite.spec).train.epochs == 30
    assert job_overrides(comparison, lite, "probe", -1, lite.spec).backbone.image_size == 48
