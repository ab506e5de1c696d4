import itertools
import math

import numpy as np
import pytest
import torch

from polyclip.metrics.ranking import hit_at_k, hit_at_k_from_scores
from polyclip.metrics.semantic import (
    random_pair_similarity,
    semantic_error_distance,
    semantic_similarity_report,
    topk_semantic_similarity,
)

S = np.array([[1.0, 0.8, 0.1, -0.2],
              [0.8, 1.0, 0.3, 0.0],
              [0.1, 0.3, 1.0, 0.5],
              [-0.2, 0.0, 0.5, 1.0]])


def test_error_distance_only_counts_mistakes():
    pred, true = np.array([0, 1, 3, 2, 0]), np.array([0, 0, 0, 2, 2])
    # Mistakes: (1 vs 0) 1-0.8, (3 vs 0) 1+0.2, (0 vs 2) 1-0.1.
    assert semantic_error_distance(pred, true, S) == pytest.approx((0.2 + 1.2 + 0.9) / 3)
    assert semantic_error_distance(pred, true, torch.tensor(S)) == pytest.approx((0.2 + 1.2 + 0.9) / 3)
    assert math.isnan(semantic_error_distance(true, true, S))


def test_topk_similarity_matches_naive_loop():
    rng = np.random.default_rng(0)
    scores, labels = rng.normal(size=(20, 4)), rng.integers(0, 4, 20)
    for k in (1, 2, 3):
        naive = np.mean([[S[labels[i], j] for j in np.argsort(-scores[i])[:k]] for i in range(20)])
        assert topk_semantic_similarity(scores, labels, S, k) == pytest.approx(naive)


def test_random_pair_control():
    off_diagonal = [S[i, j] for i, j in itertools.product(range(4), range(4)) if i != j]
    assert random_pair_similarity(S) == pytest.approx(np.mean(off_diagonal))  # few pairs: all used
    assert random_pair_similarity(S, exclude_diagonal=False) == pytest.approx(S.mean())
    big = np.random.default_rng(1).uniform(-1, 1, size=(300, 300))
    drawn = random_pair_similarity(big, n_pairs=10_000, seed=3)
    assert drawn == random_pair_similarity(big, n_pairs=10_000, seed=3)
    assert drawn == pytest.approx(big[~np.eye(300, dtype=bool)].mean(), abs=0.02)


def test_report_semantic_model_beats_control():
    labels = np.array([0, 1, 2, 3])
    good = np.array([[3, 2, 0, -1], [2, 3, 1, 0], [0, 1, 3, 2], [-1, 0, 2, 3]], dtype=float)
    report = semantic_similarity_report(good, labels, S, k=2)
    assert report["top1_similarity"] == pytest.approx(1.0)
    assert report["top2_similarity"] == pytest.approx((1.8 + 1.8 + 1.5 + 1.5) / 8)
    assert report["ratio_to_control"] == pytest.approx(report["top2_similarity"] / report["control_similarity"])
    assert math.isnan(report["error_distance"])


def test_hit_at_k():
    ranked = np.array([[2, 0, 1], [1, 2, 0], [0, 1, 2], [2, 1, 0]])
    targets = np.array([2, 2, 2, -1])
    assert hit_at_k(ranked, targets, ks=(1, 2, 3)) == {"hit@1": 0.25, "hit@2": 0.5, "hit@3": 0.75}
    with pytest.raises(ValueError, match="hit@5"):
        hit_at_k(ranked, targets, ks=(5,))
    scores = torch.tensor([[0.1, 0.5, 0.9], [0.9, 0.5, 0.1]])
    assert hit_at_k_from_scores(scores, torch.tensor([1, 1]), ks=(1, 2, 10)) == {
        "hit@1": 0.0, "hit@2": 1.0, "hit@10": 1.0}
