"""The semi recipe: prepare with a real (pixel-probe) teacher, and one end-to-end FixMatch job on 2 workers."""

from pathlib import Path

import numpy as np
import pytest
import torch

from jobs import data as job_data
from jobs import train
from jobs.config import load_config
from jobs.recipes import RECIPES, PrepareContext
from polyclip.backbones import create_backbone

CONFIGS = Path(__file__).resolve().parents[2] / "jobs" / "configs" / "semi"
TINY = ["data.dataset=synthetic", "data.synthetic_size=300", "data.labels_per_class=4", "data.val_per_class=5",
        "data.test_limit=60", "data.unlabeled=null", "backbone.spec=random:small_cnn@8", "train.batch_size=4",
        "method.mu=2"]
PIXEL_TEACHER = ["method.teacher.spec=pixels", "method.teacher.image_size=null", "method.teacher.threshold=0.3",
                 "method.teacher.l2_reg=0.0001"]


def pixel_context(cfg):
    dataset, split = job_data.load_data(cfg)
    pixels = create_backbone("pixels", in_chans=1)

    def features(spec, image_size, subset):
        assert spec == "pixels"
        pool = dataset.test if subset == "test" and split.test_from == "test" else dataset.train
        with torch.no_grad():
            return pixels.encode(torch.from_numpy(pool.images[getattr(split, subset)])).numpy()

    return PrepareContext(cfg=cfg, dataset=dataset, split=split, features=features)


def test_prepare_labels_the_pool_and_reports_teacher_precision():
    cfg = load_config(CONFIGS / "fm40_teacher.yaml", [*TINY, *PIXEL_TEACHER])
    ctx = pixel_context(cfg)
    payload = RECIPES["semi"].prepare(ctx, cfg.method)
    RECIPES["semi"].check_payload(payload)
    report = payload.report["teacher"]
    first = report["thresholds"][0]
    pool = payload.unlabeled
    # Teacher-only: the pool keeps the images that pass the threshold, with their held-back labels.
    assert len(pool["x"]) == first["accepted"] > 0 and (pool["teacher_conf"] >= 0.3).all()
    assert report["pool_size"] == len(ctx.split.unlabeled)
    precision = np.mean(pool["teacher_y"] == pool["y"])
    assert first["precision"] == pytest.approx(precision)
    assert set(first["never_passing"]) == {n for n, row in first["per_class"].items() if row["accepted"] == 0}
    assert RECIPES["semi"].streams(cfg.method) == {"": ("train", 1), "u_": ("unlabeled", 2)}


@pytest.mark.parametrize("kind", ["probe", "propagation"])
def test_unset_teacher_choices_are_made_on_validation_never_on_the_pool(kind):
    """threshold (and the probe's L2) left null are chosen on the validation split: scrambling the pool's held-back
    labels changes nothing chosen, and the worker builds its schedule from the resolved values."""
    cfg = load_config(CONFIGS / "fm40_combined.yaml", [*TINY, "method.teacher.spec=pixels",
                                                       "method.teacher.image_size=null", f"method.teacher.kind={kind}",
                                                       "method.teacher.threshold=null", "method.teacher.l2_reg=null",
                                                       "method.teacher.k=5", "method.teacher.target_precision=0.3"])
    ctx = pixel_context(cfg)
    first = RECIPES["semi"].prepare(ctx, cfg.method)
    selection = first.report["teacher_selection"]
    assert selection["selected_on"] == "validation" and 0 < selection["threshold"] <= 1
    assert first.extras.teacher.threshold == selection["threshold"]
    scrambled = pixel_context(cfg)
    scrambled.dataset.train.labels[scrambled.split.unlabeled] = np.random.default_rng(1).permutation(
        scrambled.dataset.train.labels[scrambled.split.unlabeled])
    again = RECIPES["semi"].prepare(scrambled, cfg.method)
    assert again.report["teacher_selection"]["threshold"] == selection["threshold"]
    assert again.extras == first.extras


def test_supervised_baseline_has_no_pool():
    cfg = load_config(CONFIGS / "fm40_supervised.yaml", TINY)
    payload = RECIPES["semi"].prepare(pixel_context(cfg), cfg.method)
    assert payload.unlabeled is None and RECIPES["semi"].streams(cfg.method) == {"": ("train", 1)}
    assert RECIPES["semi"].build_task(cfg, cfg.method, payload).pseudo_labels is False


def test_strong_augmentation_keys_keep_their_names_into_the_library():
    import inspect

    from polyclip.augment.fixmatch import fixmatch_strong

    keys = {"randaugment_n", "randaugment_m", "cutout", "flip_p", "max_shift"}
    assert keys <= set(RECIPES["semi"].params.model_fields)
    assert keys <= set(inspect.signature(fixmatch_strong).parameters)


@pytest.mark.timeout(400)
def test_fixmatch_adaptive_with_teacher_two_workers(ray_cluster, tmp_path):
    overrides = [*TINY, *PIXEL_TEACHER, "method.adaptive_threshold.eps=0.01", "train.epochs=2",
                 "train.steps_per_epoch=2", "train.eval_every=1", "scaling.num_workers=2",
                 f"run.output_dir={tmp_path}", f"run.feature_store={tmp_path / 'cache'}"]
    metrics = train.main(["--config", str(CONFIGS / "fm40_combined.yaml"), *overrides])
    assert metrics["epochs"] == 2 and 0.0 <= metrics["test"]["top1"] <= 1.0
    last = metrics["history"][-1]
    for key in ("mask_rate", "teacher_mask_rate", "teacher_threshold", "threshold/cat", "accepted/cat"):
        assert key in last, key
    # 2 workers x 2 steps x (mu=2 x batch 4) unlabeled images per epoch, counted across workers.
    seen = 2 * 2 * 8
    assert sum(last[k] for k in last if k.startswith("accepted/")) == pytest.approx(last["mask_rate"] * seen)
    state = torch.load(tmp_path / "fm40-combined" / "checkpoint" / "state.pt", weights_only=True)
    assert "ema.module.head.weight" in state["task"] and "thresholds.tau" in state["task"]
    assert int(state["task"]["epoch"]) == 2
