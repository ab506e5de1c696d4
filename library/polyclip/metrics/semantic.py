"""Semantic metrics: how close, in word-vector space, a classifier's guesses are to the truth.

All functions take the ``(C, C)`` label similarity matrix ``S`` (cosine similarity of
the labels' word vectors, :func:`polyclip.text.label_similarity_matrix`) as a numpy
array or a tensor, and plain numpy predictions.
"""

from __future__ import annotations

import numpy as np
import torch


def _as_numpy(similarity: np.ndarray | torch.Tensor) -> np.ndarray:
    if isinstance(similarity, torch.Tensor):
        return similarity.detach().cpu().double().numpy()
    return np.asarray(similarity, dtype=np.float64)


def _topk(scores: np.ndarray, k: int) -> np.ndarray:
    """Indices of the ``k`` highest scores per row, best first."""
    k = min(k, scores.shape[1])
    part = np.argpartition(-scores, kth=k - 1, axis=1)[:, :k]
    order = np.argsort(-np.take_along_axis(scores, part, axis=1), axis=1, kind="stable")
    return np.take_along_axis(part, order, axis=1)


def semantic_error_distance(predictions: np.ndarray, labels: np.ndarray,
                            similarity: np.ndarray | torch.Tensor) -> float:
    """Mean word-vector cosine distance ``1 - S[pred, true]`` over misclassified examples.

    The CES paper's measure (0.3139 with CES loss, 0.3530 with cross-entropy on
    Tiny-ImageNet): lower means the mistakes are between related labels.

    Args:
        predictions: ``(N,)`` predicted labels.
        labels: ``(N,)`` true labels.
        similarity: ``(C, C)`` label similarity.

    Returns:
        The mean distance, or NaN when nothing is misclassified.
    """
    S = _as_numpy(similarity)
    predictions, labels = np.asarray(predictions), np.asarray(labels)
    wrong = predictions != labels
    if not wrong.any():
        return float("nan")
    return float((1.0 - S[predictions[wrong], labels[wrong]]).mean())


def topk_semantic_similarity(scores: np.ndarray, labels: np.ndarray, similarity: np.ndarray | torch.Tensor,
                             k: int = 3) -> float:
    """Mean similarity ``S[true, pred_j]`` of each example's top-``k`` predictions to its true label.

    DeViSE report, Figure 8: the top-3 predictions of every image, averaged. A correct
    top prediction contributes 1.

    Args:
        scores: ``(N, C)`` logits, probabilities or cosine scores.
        labels: ``(N,)`` true labels.
        similarity: ``(C, C)`` label similarity.
        k: Predictions per example.
    """
    S = _as_numpy(similarity)
    top = _topk(np.asarray(scores), k)
    return float(S[np.asarray(labels)[:, None], top].mean())


def random_pair_similarity(similarity: np.ndarray | torch.Tensor, n_pairs: int = 10_000, seed: int = 0,
                           exclude_diagonal: bool = True) -> float:
    """The control of DeViSE Figure 8: mean similarity of random label pairs.

    Args:
        similarity: ``(A, B)`` similarity between two label sets (or ``(C, C)`` within one).
        n_pairs: Distinct pairs to draw; every pair is used when there are no more than this.
        seed: Seed of the draw.
        exclude_diagonal: Leave out ``(i, i)`` pairs (a label with itself) of a square matrix.
    """
    S = _as_numpy(similarity)
    valid = np.ones(S.shape, dtype=bool)
    if exclude_diagonal and S.shape[0] == S.shape[1]:
        np.fill_diagonal(valid, False)
    values = S[valid]
    if len(values) == 0:
        raise ValueError("no label pairs to draw from")
    if len(values) > n_pairs:
        values = np.random.default_rng(seed).choice(values, size=n_pairs, replace=False)
    return float(values.mean())


def semantic_similarity_report(scores: np.ndarray, labels: np.ndarray, similarity: np.ndarray | torch.Tensor,
                               k: int = 3, n_control: int = 10_000, seed: int = 0) -> dict[str, float]:
    """DeViSE Figure 8 in numbers: top-``k`` prediction similarity against a random-pair control.

    Args:
        scores: ``(N, C)`` scores.
        labels: ``(N,)`` true labels.
        similarity: ``(C, C)`` label similarity.
        k: Predictions per example.
        n_control: Random label pairs in the control.
        seed: Seed of the control's draw.

    Returns:
        ``top{k}_similarity``, ``top1_similarity``, ``control_similarity``,
        ``ratio_to_control`` (top-k over control) and ``error_distance``
        (:func:`semantic_error_distance`, NaN without mistakes).
    """
    scores, labels = np.asarray(scores), np.asarray(labels)
    topk = topk_semantic_similarity(scores, labels, similarity, k)
    control = random_pair_similarity(similarity, n_control, seed)
    return {
        f"top{k}_similarity": topk,
        "top1_similarity": topk_semantic_similarity(scores, labels, similarity, 1),
        "control_similarity": control,
        "ratio_to_control": topk / control if control > 0 else float("nan"),
        "error_distance": semantic_error_distance(scores.argmax(axis=1), labels, similarity),
    }


__all__ = ["random_pair_similarity", "semantic_error_distance", "semantic_similarity_report",
           "topk_semantic_similarity"]
