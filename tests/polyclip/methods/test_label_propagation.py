"""Label propagation against naive dense references, on synthetic clusters and Fashion-MNIST pixels."""

import math

import numpy as np
import pytest
import torch

from polyclip.methods.label_propagation import (
    certainty,
    combine_features,
    conjugate_gradient,
    distribution_alignment,
    knn,
    label_propagation,
    label_propagation_teacher,
    normalized_adjacency,
    propagate_with_validation,
    sinkhorn_balance,
)
from polyclip.methods.teacher import choose_confidence_threshold, fit_probe_teacher


@pytest.fixture(autouse=True)
def _one_thread():
    """Small tensors: on a shared CPU, extra intra-op threads only contend."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def moons(n_per_class: int, seed: int, noise: float = 0.06):
    """Two interleaved half circles: linearly inseparable, but each is a connected manifold."""
    rng = np.random.default_rng(seed)
    t = rng.uniform(0, math.pi, size=(2, n_per_class))
    upper = np.stack([np.cos(t[0]), np.sin(t[0])], 1)
    lower = np.stack([1 - np.cos(t[1]), 0.5 - np.sin(t[1])], 1)
    x = np.concatenate([upper, lower]) + noise * rng.normal(size=(2 * n_per_class, 2))
    # Lift to 3-d with a constant offset so cosine similarity keeps the 2-d geometry local.
    return np.concatenate([x, np.full((len(x), 1), 3.0)], 1).astype(np.float32), np.repeat([0, 1], n_per_class)


def curves(num_classes: int, n_per_class: int, dim: int, seed: int):
    """Fashion-MNIST-like sizes: each class a noisy 1-d curve through ``dim`` dimensions."""
    rng = np.random.default_rng(seed)
    starts, ends = rng.normal(size=(2, num_classes, dim))
    t = rng.uniform(0, 1, size=(num_classes, n_per_class, 1))
    bend = np.sin(math.pi * t) * rng.normal(size=(num_classes, 1, dim))
    x = starts[:, None] + t * (ends - starts)[:, None] + bend + 0.05 * rng.normal(size=(num_classes, n_per_class, dim))
    return x.reshape(-1, dim).astype(np.float32), np.repeat(np.arange(num_classes), n_per_class)


def test_knn_matches_brute_force_in_any_chunking():
    x = combine_features(np.random.default_rng(0).normal(size=(50, 6)))
    sims = x @ x.T
    sims.fill_diagonal_(-math.inf)
    expected = sims.topk(4, dim=1)
    for chunk in (1, 7, 50, 1000):
        idx, val = knn(x, 4, chunk)
        assert torch.equal(idx, expected.indices) and torch.allclose(val, expected.values)
        assert not (idx == torch.arange(50)[:, None]).any()


def test_adjacency_matches_a_dense_reference():
    x = combine_features(np.random.default_rng(1).normal(size=(30, 5)))
    idx, val = knn(x, 3)
    adjacency = normalized_adjacency(idx, val, gamma=3.0).to_dense()
    w = torch.zeros(30, 30)
    for i in range(30):
        for j, s in zip(idx[i].tolist(), val[i].tolist()):
            w[i, j] += max(s, 0.0) ** 3
    w = w + w.T
    d = w.sum(1).rsqrt()
    torch.testing.assert_close(adjacency, d[:, None] * w * d[None, :])
    torch.testing.assert_close(adjacency, adjacency.T)


def test_conjugate_gradient_solves_the_zhou_system():
    x = combine_features(np.random.default_rng(2).normal(size=(40, 4)))
    a = normalized_adjacency(*knn(x, 5))
    y = torch.zeros(40, 3)
    y[[0, 1, 2], [0, 1, 2]] = 1.0
    exact = torch.linalg.solve(torch.eye(40) - 0.9 * a.to_dense(), y)
    torch.testing.assert_close(conjugate_gradient(a, y, 0.9, iterations=60), exact, atol=1e-4, rtol=1e-4)


def test_balancing_and_certainty():
    probs = torch.tensor([[0.9, 0.1], [0.8, 0.2], [0.7, 0.3], [0.4, 0.6]])
    balanced = sinkhorn_balance(probs, iterations=50)
    torch.testing.assert_close(balanced.sum(1), torch.ones(4))
    torch.testing.assert_close(balanced.sum(0), torch.tensor([2.0, 2.0]), atol=1e-3, rtol=0)
    aligned = distribution_alignment(probs)
    torch.testing.assert_close(aligned.sum(1), torch.ones(4))
    assert (aligned[:, 1] > probs[:, 1]).all()  # the rare class is lifted
    weights = certainty(torch.tensor([[1.0, 0.0], [0.5, 0.5], [0.9, 0.1]]))
    h = -(0.9 * math.log(0.9) + 0.1 * math.log(0.1))
    torch.testing.assert_close(weights, torch.tensor([1.0, 0.0, 1 - h / math.log(2)]))


def test_propagation_follows_the_manifold_where_a_probe_cannot():
    x, y = moons(300, seed=3)
    labels = np.full(len(y), -1)
    labels[[0, 300]] = [0, 1]  # one label per moon
    result = label_propagation(x, labels, 2, k=10, balance="none", iterations=60)
    pred = result.probabilities.argmax(1)
    assert (pred == y).mean() > 0.97
    probe = fit_probe_teacher(x[[0, 300]], y[[0, 300]], x, 2)
    assert (probe.argmax(1) == y).mean() < 0.9
    assert result.probabilities.shape == (600, 2) and result.weights.shape == (600,)
    assert np.allclose(result.probabilities.sum(1), 1.0, atol=1e-5)
    assert result.weights.min() >= 0 and result.weights.max() <= 1


def test_fashion_mnist_sized_clusters_as_a_teacher():
    """10 curved classes, 4 labels each, a pool of 4,000: the teacher labels the pool well, by chunks."""
    x, y = curves(10, 404, 32, seed=4)
    rng = np.random.default_rng(0)
    labeled = np.concatenate([rng.choice(np.flatnonzero(y == c), 4, replace=False) for c in range(10)])
    pool = np.setdiff1d(np.arange(len(y)), labeled)
    probs = label_propagation_teacher(x[labeled], y[labeled], x[pool], 10, k=10, chunk_size=512)
    assert probs.shape == (len(pool), 10) and probs.dtype == np.float32
    assert (probs.argmax(1) == y[pool]).mean() > 0.95
    # Sinkhorn keeps the predicted classes near the uniform prior.
    counts = np.bincount(probs.argmax(1), minlength=10) / len(pool)
    assert counts.min() > 0.07 and counts.max() < 0.13
    # Chunking changes nothing.
    again = label_propagation_teacher(x[labeled], y[labeled], x[pool], 10, k=10, chunk_size=4096)
    np.testing.assert_allclose(again, probs, atol=1e-5)


def test_validation_nodes_pick_the_threshold_without_pool_labels():
    x, y = curves(4, 300, 16, seed=5)
    rng = np.random.default_rng(1)
    order = rng.permutation(len(y))
    labeled, val, pool = order[:8], order[8:208], order[208:]
    pool_probs, val_probs = propagate_with_validation(x[labeled], y[labeled], x[pool], x[val], 4, k=10)
    assert pool_probs.shape == (len(pool), 4) and val_probs.shape == (200, 4)
    tau, precision, _ = choose_confidence_threshold(val_probs, y[val], target_precision=0.9)
    keep = pool_probs.max(1) >= tau
    assert keep.any() and (pool_probs.argmax(1)[keep] == y[pool][keep]).mean() >= precision - 0.1


def test_several_backbones_count_alike():
    rng = np.random.default_rng(6)
    a, b = rng.normal(size=(20, 3)), 100 * rng.normal(size=(20, 7))
    both = combine_features([a, b])
    assert both.shape == (20, 10)
    torch.testing.assert_close(both.norm(dim=1), torch.ones(20))
    torch.testing.assert_close(both[:, :3].norm(dim=1), torch.full((20,), 2 ** -0.5))


@pytest.mark.parametrize(("kwargs", "match"), [
    ({"alpha": 1.0}, "alpha must be in \\(0, 1\\), got 1.0"),
    ({"balance": "greedy"}, "balance must be one of .* got 'greedy'"),
    ({"k": 10}, "k must be in \\[1, 9\\] for 10 images, got 10"),
    ({"labels": np.full(10, -1)}, "no labeled image"),
    ({"labels": np.array([0, 5] + [-1] * 8)}, "labels must be -1 or in \\[0, 3\\)"),
    ({"labels": np.zeros(9, dtype=int)}, "labels must be \\(10,\\)"),
    ({"prior": [1.0, 0.0, 1.0]}, "prior must be 3 positive values"),
])
def test_bad_arguments_are_named(kwargs, match):
    args = {"features": np.random.default_rng(0).normal(size=(10, 4)), "labels": np.array([0, 1, 2] + [-1] * 7),
            "num_classes": 3, "k": 3} | kwargs
    with pytest.raises(ValueError, match=match):
        label_propagation(**args)


@pytest.mark.slow
def test_beats_a_probe_on_fashion_mnist_pixels(fashion_mnist):
    """40 labels, a 6,000-image pool of real Fashion-MNIST pixels."""
    x = fashion_mnist.train.images[:6040].reshape(6040, -1).astype(np.float32) / 255.0
    x = x - x.mean(0)  # centred pixels: cosine then compares shapes, not brightness
    y = fashion_mnist.train.labels[:6040]
    rng = np.random.default_rng(0)
    labeled = np.concatenate([rng.choice(np.flatnonzero(y == c), 4, replace=False) for c in range(10)])
    pool = np.setdiff1d(np.arange(len(y)), labeled)
    lp = (label_propagation_teacher(x[labeled], y[labeled], x[pool], 10, k=10).argmax(1) == y[pool]).mean()
    probe = (fit_probe_teacher(x[labeled], y[labeled], x[pool], 10).argmax(1) == y[pool]).mean()
    assert lp > probe + 0.02, (lp, probe)
