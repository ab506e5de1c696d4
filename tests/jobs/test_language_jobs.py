"""Language-guided supervised jobs: CES config checks, label-vector errors, semantic metrics, the comparison."""

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from jobs import data as job_data
from jobs import train
from jobs.config import ConfigError, parse_config
from jobs.language_comparison import load_comparison, table_row, write_table
from jobs.recipes import RECIPES, PrepareContext
from jobs.recipes import finetune as finetune_recipe
from jobs.recipes.base import Payload
from jobs.recipes.finetune import FinetuneExtras
from polyclip.losses.ces import CESLoss
from polyclip.text import MissingLabelVectorsError

ROOT = Path(__file__).resolve().parents[2]
LANGUAGE = ROOT / "jobs" / "configs" / "language"


def _cfg(**extra):
    data = {"name": "t", "data": {"dataset": "synthetic", "labels_per_class": 5, "val_per_class": 5,
                                  "test_limit": 40, "synthetic_size": 200},
            "backbone": {"spec": "random:small_cnn@4"}, "method": {"name": "finetune", "loss": "ces"}}
    return parse_config({**data, **extra})


def _ctx(cfg, class_names=None):
    dataset, split = job_data.load_data(cfg)
    if class_names is not None:
        dataset = dataclasses.replace(dataset, class_names=class_names)

    def no_features(*args):
        raise AssertionError("finetune must not ask for cached features")

    return PrepareContext(cfg=cfg, dataset=dataset, split=split, features=no_features)


def test_ces_without_word_vectors_fails_at_parse_time_naming_both_keys():
    data = {"name": "t", "method": {"name": "finetune", "loss": "ces"}}
    with pytest.raises(ConfigError, match=r"method\.loss.*'ces'.*word_vectors"):
        parse_config(data)  # before Ray starts, before any data is loaded


def test_ces_prepare_ships_the_similarity_matrix_and_build_task_uses_it():
    cfg = _cfg(word_vectors={"source": "glove-6b-50d"})
    payload = RECIPES["finetune"].prepare(_ctx(cfg), cfg.method)
    RECIPES["finetune"].check_payload(payload)
    S = payload.extras.similarity
    assert S.shape == (10, 10) and np.allclose(np.diag(S), 1.0)
    cat, dog, car = 0, 1, 2  # synthetic class names: cat, dog, car, ...
    assert S[cat, dog] > S[cat, car]
    assert payload.class_names == ["cat", "dog", "car", "truck", "ship", "airplane", "bird", "horse", "frog", "deer"]
    task = RECIPES["finetune"].build_task(cfg, cfg.method, payload)
    assert isinstance(task.loss_fn, CESLoss) and task.loss_fn.mode == "hard"  # the paper's form by default
    torch.testing.assert_close(task.loss_fn.similarity, torch.as_tensor(S))
    assert "loss_fn.similarity" in dict(task.named_buffers())  # a buffer: moves to the device with the task
    assert task.augment is None


def test_unknown_label_vectors_fail_listing_every_label():
    cfg = _cfg(word_vectors={"source": "glove-6b-50d"})
    names = ["cat", "dog", "qzxblorf", "truck", "ship", "airplane", "bird", "horse", "frog", "wubbadubbaz"]
    with pytest.raises(MissingLabelVectorsError) as err:
        RECIPES["finetune"].prepare(_ctx(cfg, class_names=names), cfg.method)
    assert err.value.labels == ["qzxblorf", "wubbadubbaz"]
    assert "qzxblorf" in str(err.value) and "wubbadubbaz" in str(err.value)


def test_perturbation_params_reach_the_pipeline():
    cfg = parse_config({"name": "t", "backbone": {"spec": "random:small_cnn@4"},
                        "method": {"name": "finetune", "augment": "perturbation",
                                   "perturbation": {"noise_p": 0.3, "blur_p": 0.0, "flip_p": 1.0}}})
    images = {"x": np.zeros((2, 1, 28, 28), np.uint8), "y": np.zeros(2, np.int64)}
    payload = Payload(train=images, val=images, test=images, class_names=["a", "b"], extras=FinetuneExtras())
    task = finetune_recipe.build_task(cfg, cfg.method, payload)
    flip, _, blur, noise = task.augment
    assert noise.p == 0.3 and blur.p == 0.0 and flip.p == 1.0
    task.train()
    x = torch.arange(28, dtype=torch.uint8).repeat(1, 1, 28, 1)
    assert not torch.equal(task.backbone.to_unit(x), task.augment(task.backbone.to_unit(x)))  # flip_p = 1
    with pytest.raises(Exception, match="noise_p"):
        parse_config({"name": "t", "method": {"name": "finetune", "perturbation": {"noise_p": 1.5}}})


def test_language_configs_and_comparison_validate():
    _, jobs = load_comparison(LANGUAGE / "comparison.yaml")
    assert list(jobs) == ["CE loss", "CES loss", "Distilled student", "Teacher + classifier", "Classifier"]
    assert jobs["CES loss"].method.loss == "ces" and jobs["CES loss"].word_vectors is not None
    assert jobs["Distilled student"].method.teacher == "efficientnet_lite:0"
    assert jobs["Classifier"].backbone.spec == "pixels" and jobs["Classifier"].method.depth == 4
    assert all(cfg.word_vectors is not None for cfg in jobs.values())
    assert {cfg.data.model_dump_json() for cfg in jobs.values()} == {jobs["CE loss"].data.model_dump_json()}


def test_comparison_table_files(tmp_path):
    metrics = {"name": "r", "history": [{"train_loss": 0.5, "val_loss": 0.7, "train_acc": 0.9}],
               "val": {"top1": 0.8}, "test": {"top1": 0.75, "n": 100},
               "semantic": {"semantic_error_distance": 0.41}}
    rows = [table_row("CE loss", metrics), table_row("Classifier", {**metrics, "semantic": {}})]
    paths = write_table(rows, tmp_path, "Training results")
    md = paths["md"].read_text()
    assert "| CE loss | 0.5000 | 0.7000 | 90.00% | 80.00% | 75.00% | 0.4100 |" in md
    assert "n/a" in md and paths["png"].stat().st_size > 1000
    assert json.loads(paths["json"].read_text())[0]["test_acc"] == 0.75


@pytest.mark.timeout(400)
def test_ces_job_writes_semantic_metrics(ray_cluster, tmp_path):
    """One e2e run: finetune with CES + perturbations on synthetic data, 2 Ray Train workers."""
    metrics = train.main([
        "--config", str(LANGUAGE / "ces.yaml"), f"run.output_dir={tmp_path}", f"run.feature_store={tmp_path / 'c'}",
        "name=ces-e2e", "data.dataset=synthetic", "data.synthetic_size=300", "data.labels_per_class=10",
        "data.val_per_class=5", "data.test_limit=60", "backbone.spec=random:small_cnn@8", "train.epochs=2",
        "train.batch_size=16", "scaling.num_workers=2",
    ])
    stored = json.loads((tmp_path / "ces-e2e" / "metrics.json").read_text())
    semantic = stored["semantic"]
    assert semantic == metrics["semantic"] and semantic["word_vectors"] == "glove-6b-50d"
    assert set(semantic) >= {"semantic_error_distance", "top3_similarity", "top1_similarity", "control_similarity"}
    if semantic["num_errors"]:
        assert 0.0 < semantic["semantic_error_distance"] < 2.0
    assert 0.0 < semantic["top3_similarity"] <= 1.0
    assert "semantic_error_distance" in (tmp_path / "ces-e2e" / "report.md").read_text()
    assert stored["epochs"] == 2 and np.isfinite(stored["history"][-1]["train_loss"])
