"""Zero-shot heads through the job layer: CLIP params, DeViSE and CLIP end to end, MoE recipe units."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from jobs.config import parse_config
from jobs.recipes.clip_zeroshot import ClipZeroShotParams, prompt_names

NAMES = ["cat", "dog", "car", "truck", "ship"]


# --- CLIP params ---------------------------------------------------------------------------------

def test_clip_params_check_templates_and_class_prompts():
    with pytest.raises(Exception, match="exactly one"):
        ClipZeroShotParams(templates=["a photo"])
    params = ClipZeroShotParams(templates=["a photo of a {}."], template_set="simple")
    assert params.all_templates()[0] == "a photo of a {}." and len(params.all_templates()) == 9  # one duplicate
    assert prompt_names(["T-shirt/top", "Bag"], {"T-shirt/top": "t-shirt"}) == ["t-shirt", "Bag"]
    with pytest.raises(ValueError, match="unknown classes"):
        prompt_names(["Bag"], {"Sandal": "sandal"})


def test_clip_method_refuses_training(tmp_path, monkeypatch):
    """An evaluation-only recipe has no task; jobs.train names the job to run before it loads any data."""
    from jobs import train
    from jobs.config import ConfigError
    from jobs.recipes import RECIPES

    recipe = RECIPES["clip_zeroshot"]
    assert not recipe.trainable and recipe.build_task is None and recipe.evaluated_by == "jobs.zeroshot_eval"
    assert [name for name, r in RECIPES.items() if not r.trainable] == ["clip_zeroshot"]
    cfg = parse_config({"name": "c", "method": {"name": "clip_zeroshot"}, "run": {"output_dir": str(tmp_path)}})

    def no_data(*args, **kwargs):
        raise AssertionError("jobs.train loaded data for an evaluation-only method")

    monkeypatch.setattr(train, "load_data", no_data)
    with pytest.raises(ConfigError, match=r"'clip_zeroshot' has nothing to train: run it with python -m "
                                          r"jobs.zeroshot_eval --config"):
        train.run_job(cfg)
    assert not cfg.run_dir.exists()


# --- end to end through Ray ----------------------------------------------------------------------

@pytest.mark.timeout(900)
def test_devise_job_holds_out_unseen_classes(ray_cluster, tmp_path):
    from jobs import train

    config = {
        "name": "devise-e2e", "seed": 3,
        "data": {"dataset": "synthetic", "labels_per_class": 10, "val_per_class": 5, "test_limit": 200,
                 "synthetic_size": 300},
        "backbone": {"spec": "pixels"},
        "method": {"name": "devise", "num_unseen": 3, "standardize": True},
        "train": {"epochs": 2, "batch_size": 16, "lr": 0.01},
        "scaling": {"num_workers": 2},
        "run": {"output_dir": str(tmp_path), "feature_store": str(tmp_path / "cache"), "encode_workers": 1},
    }
    path = tmp_path / "devise.yaml"
    path.write_text(yaml.safe_dump(config))
    metrics = train.main(["--config", str(path)])
    z = metrics["zero_shot"]
    for key in ("unseen_top1", "seen_top1", "generalised_top1", "generalised_harmonic", "hit", "semantic",
                "unseen_classes", "seen_classes"):
        assert key in z, key
    assert set(z["hit"]) == {"hit@1", "hit@3", "hit@5", "hit@10"}
    assert {"top3_similarity", "control_similarity", "ratio_to_control"} <= set(z["semantic"])
    unseen = z["unseen_classes"]
    assert len(unseen) == 3 and len(z["seen_classes"]) == 7
    # Unseen classes never reach training or validation...
    assert all(z["train_labels_per_class"][n] == 0 for n in unseen)
    assert all(z["val_labels_per_class"][n] == 0 for n in unseen)
    assert all(z["train_labels_per_class"][n] == 10 for n in z["seen_classes"])
    # ...although the job's split drew labels for them (the recipe filtered them out)...
    from polyclip.data.datasets import load_dataset

    split = json.loads((tmp_path / "devise-e2e" / "split.json").read_text())
    names = load_dataset("synthetic", synthetic_size=300, seed=3).class_names
    drawn = load_dataset("synthetic", synthetic_size=300, seed=3).train.labels[np.asarray(split["labeled"])]
    assert {names[c] for c in drawn} >= set(unseen)
    # ...while the full test set, unseen classes included, is scored over all 10 classes.
    stored = json.loads((tmp_path / "devise-e2e" / "metrics.json").read_text())
    assert stored["test"]["n"] == 200 and z["n_test_unseen"] > 0
    assert stored["test"]["top1"] == pytest.approx(z["generalised_top1"])
    assert stored["zero_shot"]["unseen_top1"] == pytest.approx(z["unseen_top1"])


@pytest.fixture(scope="module")
def tiny_clip_checkpoint(tmp_path_factory) -> Path:
    """A random-init ViT-S-32-alt (the smallest open_clip architecture) saved as a local checkpoint.

    A file, not ``random:``, so the Ray encoders and the driver's text tower hold the same weights.
    """
    import open_clip

    torch.manual_seed(0)
    model = open_clip.create_model("ViT-S-32-alt", pretrained=None, force_image_size=32)
    path = tmp_path_factory.mktemp("clip") / "tiny_clip.pt"
    torch.save({k: v.half() if v.is_floating_point() else v for k, v in model.state_dict().items()}, path)
    return path


@pytest.mark.timeout(900)
def test_clip_zeroshot_eval_job_end_to_end(ray_cluster, tmp_path, tiny_clip_checkpoint):
    from jobs import zeroshot_eval
    from polyclip.backbones import create_backbone
    from polyclip.data.datasets import load_dataset
    from polyclip.features.cache import encode_images
    from polyclip.text.clip_zeroshot import zero_shot_classifier, zero_shot_logits

    spec = f"open_clip:ViT-S-32-alt@{tiny_clip_checkpoint}"
    config = Path(__file__).resolve().parents[2] / "jobs" / "configs" / "zeroshot" / "clip_eval.yaml"
    metrics = zeroshot_eval.main([
        "--config", str(config), "name=clip-e2e", "data.dataset=synthetic", "data.synthetic_size=200",
        "data.test_limit=60", "data.val_per_class=0", f"backbone.spec={spec}", "backbone.image_size=32",
        "method.class_prompts={}", "method.template_set=none", f"run.output_dir={tmp_path}",
        f"run.feature_store={tmp_path / 'cache'}", "run.encode_workers=2",
    ])
    run_dir = tmp_path / "clip-e2e"
    for name in ("metrics.json", "report.md", "confusion.png", "predictions.npz", "zero_shot_head.npz"):
        assert (run_dir / name).exists(), name
    head = metrics["zero_shot_head"]
    assert head["num_templates"] == 3 and head["embedding_dim"] == 256
    assert metrics["test"]["n"] == 60 and len(metrics["zero_shot"]["unseen_classes"]) == 3

    # The same numbers by hand, from the same checkpoint, without Ray or the cache.
    backbone = create_backbone(spec, image_size=32)
    assert head["logit_scale"] == pytest.approx(1 / 0.07, rel=1e-3)  # open_clip's initial temperature
    dataset = load_dataset("synthetic", synthetic_size=200, seed=0)
    split = json.loads((run_dir / "split.json").read_text())
    test_idx = np.asarray(split["test"])
    weights = zero_shot_classifier(backbone, None, dataset.class_names, head["templates"])
    assert weights.shape == (256, 10) and torch.allclose(weights.norm(dim=0), torch.ones(10), atol=1e-5)
    features = encode_images(backbone, dataset.test.images[test_idx], batch_size=100)
    logits = zero_shot_logits(torch.from_numpy(features), weights, backbone.logit_scale).numpy()
    with np.load(run_dir / "predictions.npz") as stored:
        np.testing.assert_allclose(stored["test_logits"], logits, rtol=1e-3, atol=1e-3)
        np.testing.assert_array_equal(stored["test_labels"], dataset.test.labels[test_idx])
    manual = float((logits.argmax(1) == dataset.test.labels[test_idx]).mean())
    assert abs(metrics["test"]["top1"] - manual) <= 1 / 60 + 1e-9


# --- MoE recipe ----------------------------------------------------------------------------------

def _moe_ctx(params_dict, *, val_per_class=5, seed=0):
    """A PrepareContext over synthetic data with pixel 'features' (no Ray, no cache)."""
    from jobs.recipes.base import PrepareContext
    from polyclip.data.datasets import load_dataset
    from polyclip.data.splits import make_split

    cfg = parse_config({"name": "m", "seed": seed, "method": params_dict,
                        "data": {"dataset": "synthetic", "val_per_class": val_per_class}})
    dataset = load_dataset("synthetic", synthetic_size=400, seed=seed)
    split = make_split(dataset.train.labels, dataset.class_names, labels_per_class=20, seed=seed,
                       val_per_class=val_per_class, test_labels=dataset.test.labels, test_limit=100)

    def features(spec, size, subset):
        pool = dataset.test if subset == "test" else dataset.train
        images = pool.images[getattr(split, subset)]
        return images.reshape(len(images), 28 * 28).astype(np.float32) / 255

    return cfg, PrepareContext(cfg=cfg, dataset=dataset, split=split, features=features)


def test_moe_params_need_exactly_one_source():
    from jobs.config import ConfigError

    with pytest.raises(ConfigError, match="exactly one of superclasses"):
        parse_config({"name": "m", "method": {"name": "moe"}})
    with pytest.raises(ConfigError, match="exactly one of superclasses"):
        parse_config({"name": "m",
                      "method": {"name": "moe", "superclasses": [["cat"]], "auto_superclasses": "vectors"}})


def test_moe_recipe_given_superclasses_build_and_report():
    from jobs.recipes import RECIPES

    groups = [["cat", "dog", "horse", "deer"], ["car", "truck", "ship", "airplane"], ["bird", "frog"]]
    cfg, ctx = _moe_ctx({"name": "moe", "superclasses": groups})
    recipe = RECIPES["moe"]
    payload = recipe.prepare(ctx, cfg.method)
    recipe.check_payload(payload)
    assert payload.class_names == list(ctx.dataset.class_names)
    assert payload.report["superclasses"] == [["cat", "dog", "horse", "deer"], ["car", "truck", "ship", "airplane"],
                                                ["bird", "frog"]]
    task = recipe.build_task(cfg, cfg.method, payload)
    x = torch.from_numpy(payload.test["x"])
    logits = task.predict(x).detach().numpy()
    assert logits.shape == (100, 10) and np.allclose(np.exp(logits).sum(1), 1, atol=1e-4)
    moe = recipe.report(cfg, cfg.method, payload, {"test_logits": logits, "test_labels": payload.test["y"]})["moe"]
    superclass = np.asarray(payload.extras.superclass_of_class)
    expected = np.mean(superclass[logits.argmax(1)] == superclass[payload.test["y"]])
    assert moe["superclass_top1"] == pytest.approx(expected) and moe["source"] == "config"
    assert all(p["true"] != p["predicted"] and p["count"] > 0 for p in moe["most_confused_pairs"])


def test_moe_recipe_confusion_superclasses_come_from_a_flat_probe():
    from jobs.recipes import RECIPES

    cfg, ctx = _moe_ctx({"name": "moe", "auto_superclasses": "confusion", "k": 3, "probe_epochs": 10})
    payload = RECIPES["moe"].prepare(ctx, cfg.method)
    info = payload.report
    assert info["source"] == "confusion" and len(info["superclasses"]) == 3
    assert sorted(n for g in info["superclasses"] for n in g) == sorted(ctx.dataset.class_names)
    assert np.asarray(info["flat_probe_val_confusion"]).sum() == len(payload.val["y"])
    assert 0.0 <= info["flat_probe_val_top1"] <= 1.0
    cfg0, ctx0 = _moe_ctx({"name": "moe", "auto_superclasses": "confusion", "k": 3}, val_per_class=0)
    with pytest.raises(ValueError, match="val_per_class > 0"):
        RECIPES["moe"].prepare(ctx0, cfg0.method)
