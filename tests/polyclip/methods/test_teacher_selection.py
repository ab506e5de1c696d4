"""Teacher settings are chosen on labeled / validation data, never on the pool's held-back labels."""

import inspect

import numpy as np
import pytest
import torch

from polyclip.methods.teacher import (
    _folds,
    choose_confidence_threshold,
    fit_probe_teacher,
    select_probe_teacher,
)


@pytest.fixture(autouse=True)
def _one_thread():
    """Tiny L-BFGS fits: extra intra-op threads only contend on a shared CPU."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def clusters(n_per_class: int, seed: int, num_classes: int = 5, dim: int = 12, spread: float = 0.9):
    rng = np.random.default_rng(100)  # the same class means for every draw
    means = rng.normal(size=(num_classes, dim)) * 1.5
    draw = np.random.default_rng(seed)
    y = np.repeat(np.arange(num_classes), n_per_class)
    x = means[y] + spread * draw.normal(size=(len(y), dim))
    return x.astype(np.float32), y


def test_choose_confidence_threshold_matches_a_naive_scan():
    probs = np.array([[0.95, 0.05], [0.9, 0.1], [0.8, 0.2], [0.3, 0.7], [0.45, 0.55], [0.6, 0.4]])
    labels = np.array([0, 0, 1, 1, 0, 0])
    # conf: .95 .9 .8 .7 .55 .6; correct: T T F T F T
    assert choose_confidence_threshold(probs, labels, [0.5, 0.7, 0.85], target_precision=0.75,
                                       min_accepted=2) == pytest.approx((0.7, 0.75, 4 / 6))
    assert choose_confidence_threshold(probs, labels, [0.5, 0.7, 0.85], target_precision=0.99,
                                       min_accepted=2) == pytest.approx((0.85, 1.0, 2 / 6))
    # Too few accepted at 0.85 for min_accepted=3: the highest candidate comes back, short of the target.
    assert choose_confidence_threshold(probs, labels, [0.85], target_precision=0.99, min_accepted=3)[0] == 0.85


def test_selection_on_validation_reaches_the_target_and_holds_on_the_pool():
    x, y = clusters(4, seed=1)
    vx, vy = clusters(40, seed=2)
    px, py = clusters(400, seed=3)  # py is used only to check the choice afterwards
    sel = select_probe_teacher(x, y, 5, val_features=vx, val_labels=vy, target_precision=0.9,
                               l2_grid=(1e-4, 1e-2, 1e-1))
    assert sel.selected_on == "validation" and sel.held_out == 200
    assert sel.precision >= 0.9 and sel.accepted_rate > 0.2
    assert [s["l2_reg"] for s in sel.scores] == [1e-4, 1e-2, 1e-1]
    assert sel.l2_reg == min(sel.scores, key=lambda s: s["nll"])["l2_reg"]
    probs = fit_probe_teacher(x, y, px, 5, l2_reg=sel.l2_reg)
    keep = probs.max(1) >= sel.threshold
    assert abs((probs.argmax(1)[keep] == py[keep]).mean() - sel.precision) < 0.08


def test_the_pool_and_its_labels_cannot_enter_the_selection():
    params = inspect.signature(select_probe_teacher).parameters
    assert not any("pool" in name or "unlabeled" in name for name in params)
    x, y = clusters(4, seed=1)
    vx, vy = clusters(40, seed=2)
    grid = (1e-3, 1e-2)
    a = select_probe_teacher(x, y, 5, val_features=vx, val_labels=vy, l2_grid=grid)
    assert a == select_probe_teacher(x, y, 5, val_features=vx, val_labels=vy, l2_grid=grid)  # deterministic
    # ...and it does read the validation labels: scrambling them changes what it measures.
    scrambled = select_probe_teacher(x, y, 5, val_features=vx, val_labels=np.random.default_rng(0).permutation(vy),
                                     l2_grid=grid)
    assert scrambled.scores != a.scores


def test_cross_validation_without_validation_data():
    x, y = clusters(4, seed=4)
    sel = select_probe_teacher(x, y, 5, folds=4, l2_grid=(1e-3, 1e-2))
    assert sel.selected_on == "cross_validation" and sel.held_out == 20
    assert sel.threshold in (0.5, 0.6, 0.7, 0.8, 0.85, 0.9, 0.95, 0.98, 0.99)
    parts = _folds(y, 4, seed=0)
    assert sorted(np.concatenate(parts).tolist()) == list(range(20))
    assert all(np.bincount(y[p], minlength=5).tolist() == [1] * 5 for p in parts)  # stratified


def test_bad_arguments_are_named():
    x, y = clusters(1, seed=5)
    with pytest.raises(ValueError, match="smallest class has 1"):
        select_probe_teacher(x, y, 5)
    with pytest.raises(ValueError, match="both val_features and val_labels"):
        select_probe_teacher(x, y, 5, val_features=x)
    with pytest.raises(ValueError, match="thresholds must not be empty"):
        choose_confidence_threshold(np.eye(2), np.arange(2), [])
