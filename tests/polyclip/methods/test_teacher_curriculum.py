"""Curriculum self-training rounds: class-balanced top-q selection, refits on growing pseudo-label sets."""

import numpy as np
import pytest
import torch

from polyclip.methods.teacher import class_balanced_top, curriculum_teacher, fit_probe_teacher


@pytest.fixture(autouse=True)
def _one_thread():
    """Small tensors: on a shared CPU, extra intra-op threads only contend."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def nearest_mean(x, y, pool, num_classes):
    """A real (if simple) teacher: softmax of minus squared distances to the class means."""
    means = np.stack([x[y == c].mean(0) for c in range(num_classes)])
    logits = -((pool[:, None, :] - means[None]) ** 2).sum(-1)
    logits -= logits.max(1, keepdims=True)
    p = np.exp(logits)
    return p / p.sum(1, keepdims=True)


def test_class_balanced_top_keeps_the_most_confident_per_class():
    probs = np.array([[0.9, 0.1], [0.8, 0.2], [0.7, 0.3], [0.6, 0.4], [0.3, 0.7], [0.45, 0.55]])
    # 50% of 6 = 3 images, i.e. round(1.5) = 2 per class; class 1 has only 2 predicted.
    assert class_balanced_top(probs, 0.5).tolist() == [0, 1, 4, 5]
    assert class_balanced_top(probs, 1 / 6).tolist() == [0, 4]  # at least one per class
    with pytest.raises(ValueError, match="fraction must be in \\(0, 1\\], got 0"):
        class_balanced_top(probs, 0)


def test_rounds_refit_on_growing_pseudo_label_sets():
    rng = np.random.default_rng(0)
    means = np.array([[-3.0, 0.0], [3.0, 0.0], [0.0, 4.0]])
    pool_y = np.repeat(np.arange(3), 200)
    pool = means[pool_y] + 1.2 * rng.normal(size=(600, 2))
    # One atypical label per class, pulled towards the middle: the first teacher is biased.
    x_l = np.array([[-1.0, 1.5], [1.0, 1.5], [0.0, 2.6]])
    y_l = np.arange(3)
    seen = []

    def recording(x, y, p, c):
        seen.append(len(y))
        return nearest_mean(x, y, p, c)

    first = nearest_mean(x_l, y_l, pool, 3)
    probs, log = curriculum_teacher(recording, x_l, y_l, pool, 3, fractions=(0.2, 0.5, 0.8))
    assert seen == [3, 3 + 120, 3 + 300, 3 + 480]
    assert [r["pseudo_labeled"] for r in log] == [0, 120, 300, 480]
    assert (probs.argmax(1) == pool_y).mean() > (first.argmax(1) == pool_y).mean() + 0.02


def test_works_with_the_probe_teacher():
    rng = np.random.default_rng(1)
    pool_y = np.repeat(np.arange(4), 100)
    centres = rng.normal(size=(4, 8)) * 2
    pool = (centres[pool_y] + rng.normal(size=(400, 8))).astype(np.float32)
    x_l = pool[[0, 100, 200, 300]]
    probs, log = curriculum_teacher(lambda x, y, p, c: fit_probe_teacher(x, y, p, c, l2_reg=1e-3), x_l,
                                    np.arange(4), pool, 4, fractions=(0.5,))
    assert probs.shape == (400, 4) and len(log) == 2 and (probs.argmax(1) == pool_y).mean() > 0.85
    with pytest.raises(ValueError, match="fractions must increase"):
        curriculum_teacher(nearest_mean, x_l, np.arange(4), pool, 4, fractions=(0.5, 0.2))
