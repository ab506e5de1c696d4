"""The zero-shot protocol: a seeded seen/unseen class split and its report.

Train on the seen classes only, test on the full test set, and report

* ``unseen_top1``: unseen test images, predicted among the unseen classes alone
  (the classic zero-shot number; chance is ``1 / #unseen``);
* ``seen_top1``: seen test images, predicted among the seen classes alone;
* ``generalised_top1``: every test image, predicted among all classes, with its
  seen and unseen parts and their harmonic mean (generalised zero-shot learning);
* ``hit@k`` over all classes, and optionally the semantic similarity of the top-3
  predictions to the true label against random label pairs (DeViSE, Figure 8).

Shared by the DeViSE recipe and the CLIP zero-shot evaluation job, so both report the
same numbers on the same class split: arrays of scores in, numbers out.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from polyclip.metrics.ranking import hit_at_k_from_scores
from polyclip.metrics.semantic import semantic_similarity_report


def choose_unseen(class_names: Sequence[str], unseen_classes: Sequence[str] | None, num_unseen: int | None,
                  seed: int) -> list[int]:
    """Indices of the held-out classes: the named ones, or ``num_unseen`` drawn with ``seed``.

    Args:
        class_names: All ``C`` class names.
        unseen_classes: Names of the unseen classes (takes precedence).
        num_unseen: How many to draw when no names are given.
        seed: Seed of the draw (the job seed: same seed, same split).

    Raises:
        ValueError: An unknown name (listing the valid ones), duplicates, or a split that
            leaves fewer than two seen classes or no unseen class.
    """
    names = list(class_names)
    if unseen_classes:
        unknown = [n for n in unseen_classes if n not in names]
        if unknown:
            raise ValueError(f"unseen_classes {unknown} are not classes of this dataset; valid: {names}")
        if len(set(unseen_classes)) != len(unseen_classes):
            raise ValueError(f"unseen_classes has duplicates: {list(unseen_classes)}")
        chosen = sorted(names.index(n) for n in unseen_classes)
    elif num_unseen:
        if not 1 <= num_unseen <= len(names) - 2:
            raise ValueError(f"num_unseen={num_unseen} must leave at least 2 of the {len(names)} classes seen")
        chosen = sorted(int(i) for i in np.random.default_rng(seed).choice(len(names), num_unseen, replace=False))
    else:
        raise ValueError("the zero-shot protocol needs unseen_classes (names) or num_unseen >= 1")
    if len(names) - len(chosen) < 2:
        raise ValueError(f"unseen classes {[names[i] for i in chosen]} leave fewer than 2 seen classes")
    return chosen


def seen_mask(labels: np.ndarray, unseen: Sequence[int]) -> np.ndarray:
    """True where a label is a seen class."""
    return ~np.isin(np.asarray(labels), np.asarray(list(unseen), dtype=np.int64))


def keep_seen(arrays: dict[str, np.ndarray], unseen: Sequence[int]) -> dict[str, np.ndarray]:
    """The rows of aligned arrays (``x``, ``y``, ...) whose label ``y`` is a seen class."""
    keep = seen_mask(arrays["y"], unseen)
    return {key: value[keep] for key, value in arrays.items()}


def _restricted_top1(scores: np.ndarray, labels: np.ndarray, classes: Sequence[int]) -> float:
    """Accuracy of the argmax over ``classes`` only, on the images of those classes."""
    cols = np.asarray(list(classes), dtype=np.int64)
    rows = np.isin(labels, cols)
    if not rows.any():
        return float("nan")
    pred = cols[scores[rows][:, cols].argmax(axis=1)]
    return float((pred == labels[rows]).mean())


def zero_shot_report(scores: np.ndarray, labels: np.ndarray, class_names: Sequence[str], unseen: Sequence[int], *,
                     similarity: np.ndarray | None = None, ks: Sequence[int] = (1, 3, 5, 10),
                     seed: int = 0) -> dict[str, Any]:
    """Every zero-shot protocol number of one set of test scores.

    Args:
        scores: ``(N, C)`` scores over all classes (logits or cosine similarities).
        labels: ``(N,)`` true labels.
        class_names: ``C`` names.
        unseen: Indices of the unseen classes.
        similarity: ``(C, C)`` label similarity; adds the DeViSE Figure 8 numbers.
        ks: Cut-offs of hit@k over all classes (capped at ``C``).
        seed: Seed of the random-pair control.

    Returns:
        A JSON-ready dict (see the module docstring).
    """
    scores, labels = np.asarray(scores, dtype=np.float64), np.asarray(labels)
    unseen = sorted(int(i) for i in unseen)
    seen = [c for c in range(len(class_names)) if c not in unseen]
    pred = scores.argmax(axis=1)
    is_seen = seen_mask(labels, unseen)
    gen_seen = float((pred[is_seen] == labels[is_seen]).mean()) if is_seen.any() else float("nan")
    gen_unseen = float((pred[~is_seen] == labels[~is_seen]).mean()) if (~is_seen).any() else float("nan")
    harmonic = 2 * gen_seen * gen_unseen / (gen_seen + gen_unseen) if gen_seen + gen_unseen > 0 else 0.0
    out: dict[str, Any] = {
        "seen_classes": [class_names[c] for c in seen],
        "unseen_classes": [class_names[c] for c in unseen],
        "n_test_seen": int(is_seen.sum()),
        "n_test_unseen": int((~is_seen).sum()),
        "unseen_top1": _restricted_top1(scores, labels, unseen),
        "unseen_chance": 1.0 / len(unseen),
        "seen_top1": _restricted_top1(scores, labels, seen),
        "generalised_top1": float((pred == labels).mean()),
        "generalised_seen_top1": gen_seen,
        "generalised_unseen_top1": gen_unseen,
        "generalised_harmonic": float(harmonic),
        "hit": hit_at_k_from_scores(scores, labels, ks),
        "unseen_hit": hit_at_k_from_scores(scores[~is_seen], labels[~is_seen], ks) if (~is_seen).any() else {},
    }
    if similarity is not None:
        out["semantic"] = semantic_similarity_report(scores, labels, similarity, k=3, seed=seed)
    return out


__all__ = ["choose_unseen", "keep_seen", "seen_mask", "zero_shot_report"]
