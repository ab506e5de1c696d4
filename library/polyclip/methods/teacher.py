"""Teachers that label an unlabeled pool: a probe on features, CLIP zero-shot, an ensemble.

Each returns class probabilities ``(N, C)`` for the pool (float32 numpy); the driver then
keeps the labels above a confidence threshold (:mod:`polyclip.methods.pseudo_label`).
:func:`select_probe_teacher` chooses a probe's L2 penalty and acceptance threshold on the
validation split or by cross-validation on the labeled images, never on the pool's
held-back labels. Features come from any ``create_backbone`` spec, so a trained polyclip checkpoint is a
teacher through ``checkpoint:<run dir>`` (its encoder, with a probe fitted on the labeled
images).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from polyclip.backbones.base import Backbone


def fit_probe_teacher(train_features: np.ndarray, train_labels: np.ndarray, pool_features: np.ndarray,
                      num_classes: int, *, l2_reg: float = 1e-3, l2_normalize: bool = True,
                      max_iter: int = 200) -> np.ndarray:
    """Fit a multinomial logistic regression on labeled features; return the pool's probabilities.

    Minimises ``mean CE(W f + b, y) + l2_reg * ||W||^2`` with L-BFGS (deterministic). The
    strength of ``l2_reg`` sets how confident the teacher gets, so it interacts with the
    acceptance threshold: with 4 labels per class an unregularised probe is confident
    about everything.

    Args:
        train_features: ``(N_l, D)`` features of the labeled images.
        train_labels: ``(N_l,)`` their labels in ``[0, num_classes)``.
        pool_features: ``(N_u, D)`` features of the pool to label.
        num_classes: ``C``.
        l2_reg: L2 penalty on the weights.
        l2_normalize: L2-normalise features first (scale-free across backbones).
        max_iter: L-BFGS iterations.

    Returns:
        ``(N_u, C)`` float32 probabilities.
    """
    labels = np.asarray(train_labels).astype(np.int64)
    if len(train_features) != len(labels) or len(labels) == 0:
        raise ValueError(f"need as many labeled features as labels, got {len(train_features)} and {len(labels)}")
    if labels.min() < 0 or labels.max() >= num_classes:
        raise ValueError(f"labels must lie in [0, {num_classes}), got range [{labels.min()}, {labels.max()}]")
    if train_features.shape[1] != pool_features.shape[1]:
        raise ValueError(f"feature sizes differ: labeled {train_features.shape[1]}, pool {pool_features.shape[1]}")

    def prep(a: np.ndarray) -> torch.Tensor:
        t = torch.as_tensor(np.asarray(a), dtype=torch.float32)
        return F.normalize(t, dim=1) if l2_normalize else t

    x, y, pool = prep(train_features), torch.as_tensor(labels), prep(pool_features)
    weight = torch.zeros(x.shape[1], num_classes, requires_grad=True)
    bias = torch.zeros(num_classes, requires_grad=True)
    optimizer = torch.optim.LBFGS([weight, bias], lr=1.0, max_iter=max_iter, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        optimizer.zero_grad()
        loss = F.cross_entropy(x @ weight + bias, y) + l2_reg * weight.pow(2).sum()
        loss.backward()
        return loss

    optimizer.step(closure)  # type: ignore[no-untyped-call]
    with torch.no_grad():
        return torch.softmax(pool @ weight + bias, dim=1).numpy().astype(np.float32)


def zero_shot_teacher(backbone: Backbone, class_names: Sequence[str], pool_features: np.ndarray, *,
                      templates: Sequence[str] | None = None) -> np.ndarray:
    """CLIP zero-shot probabilities for pool images already encoded by ``backbone``.

    Args:
        backbone: A CLIP-family backbone with real weights (``backbone.has_text``).
        class_names: ``C`` names as they read in a sentence.
        pool_features: ``(N, D)`` image embeddings from the same backbone.
        templates: Prompt templates with one ``{}``; the library's simple set if None.

    Returns:
        ``(N, C)`` float32 probabilities (softmax of ``logit_scale * cosine``).

    Raises:
        TypeError: The backbone has no text encoder.
    """
    from polyclip.text.clip_zeroshot import SIMPLE_TEMPLATES, zero_shot_classifier, zero_shot_logits

    if not backbone.has_text:
        raise TypeError(f"zero-shot teacher needs a CLIP-family backbone with a text encoder; {backbone.spec!r} has "
                        "none (use an open_clip:<arch>@<weights> spec)")
    weights = zero_shot_classifier(backbone, None, list(class_names), list(templates or SIMPLE_TEMPLATES))
    scale = backbone.logit_scale if backbone.logit_scale is not None else 100.0
    with torch.no_grad():
        logits = zero_shot_logits(torch.as_tensor(np.asarray(pool_features), dtype=torch.float32), weights, scale)
        return torch.softmax(logits, dim=1).numpy().astype(np.float32)


def ensemble_teacher(ensemble: torch.nn.Module, features: Sequence[np.ndarray]) -> np.ndarray:
    """Probabilities of a fitted :class:`polyclip.ensemble.Ensemble` over per-backbone pool features.

    Args:
        ensemble: From ``polyclip.ensemble.load_ensemble(path)``.
        features: One ``(N, D_b)`` array per member backbone, in the ensemble's order.

    Returns:
        ``(N, C)`` float32 probabilities.
    """
    logits, _ = ensemble.predict(features)  # type: ignore[operator]
    return torch.softmax(torch.as_tensor(logits).float(), dim=1).numpy().astype(np.float32)


#: L2 penalties and thresholds :func:`select_probe_teacher` searches by default.
DEFAULT_L2_GRID = (1e-4, 3e-4, 1e-3, 3e-3, 1e-2, 3e-2)
DEFAULT_THRESHOLDS = (0.5, 0.6, 0.7, 0.8, 0.85, 0.9, 0.95, 0.98, 0.99)


@dataclass(frozen=True)
class TeacherSelection:
    """Settings of a teacher chosen on labeled or validation data (never on the pool's labels).

    Attributes:
        l2_reg: The chosen L2 penalty (None for teachers without one).
        threshold: The lowest confidence threshold whose held-out precision reaches the target.
        selected_on: ``"validation"`` or ``"cross_validation"`` (folds of the labeled set).
        held_out: Number of held-out predictions the choice read.
        precision: Held-out precision of the labels accepted at ``threshold``.
        accepted_rate: Held-out share accepted at ``threshold``.
        scores: Per candidate L2 penalty: held-out ``accuracy`` and ``nll``.
    """

    l2_reg: float | None
    threshold: float
    selected_on: str
    held_out: int
    precision: float
    accepted_rate: float
    scores: list[dict[str, float]] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def choose_confidence_threshold(probs: np.ndarray, labels: np.ndarray,
                                thresholds: Sequence[float] = DEFAULT_THRESHOLDS, *, target_precision: float = 0.9,
                                min_accepted: int = 5) -> tuple[float, float, float]:
    """The lowest threshold whose accepted held-out labels reach ``target_precision``.

    Held-out images are drawn like the pool, so the precision of their accepted labels
    estimates the precision of the pool's accepted labels without reading the pool's labels.

    Args:
        probs: ``(N, C)`` teacher probabilities of held-out (validation or out-of-fold) images.
        labels: ``(N,)`` their true labels.
        thresholds: Candidates.
        target_precision: Precision to reach.
        min_accepted: A threshold needs at least this many accepted images to count.

    Returns:
        ``(threshold, precision, accepted_rate)``; the highest candidate (with its precision)
        when none reaches the target.
    """
    probs = np.asarray(probs, dtype=np.float64)
    labels = np.asarray(labels).astype(np.int64)
    if probs.ndim != 2 or len(probs) != len(labels) or len(labels) == 0:
        raise ValueError(f"probs {probs.shape} must be (N, C) with N = {len(labels)} labels, N > 0")
    if not thresholds:
        raise ValueError("thresholds must not be empty")
    conf, correct = probs.max(1), probs.argmax(1) == labels
    candidates = []
    for tau in sorted(thresholds):
        keep = conf >= tau
        n = int(keep.sum())
        precision = float(correct[keep].mean()) if n else 0.0
        candidates.append((float(tau), precision, n / len(labels)))
        if n >= min_accepted and precision >= target_precision:
            return candidates[-1]
    return candidates[-1]


def _folds(labels: np.ndarray, folds: int, seed: int) -> list[np.ndarray]:
    """Stratified fold ids: each class's images dealt round-robin after a seeded shuffle."""
    rng = np.random.default_rng(seed)
    fold = np.empty(len(labels), dtype=np.int64)
    for c in np.unique(labels):
        idx = rng.permutation(np.flatnonzero(labels == c))
        fold[idx] = np.arange(len(idx)) % folds
    return [np.flatnonzero(fold == f) for f in range(folds)]


def select_probe_teacher(labeled_features: np.ndarray, labeled_labels: np.ndarray, num_classes: int, *,
                         val_features: np.ndarray | None = None, val_labels: np.ndarray | None = None,
                         l2_grid: Sequence[float] = DEFAULT_L2_GRID,
                         thresholds: Sequence[float] = DEFAULT_THRESHOLDS, target_precision: float = 0.9,
                         folds: int = 4, min_accepted: int = 5, seed: int = 0) -> TeacherSelection:
    """Choose the probe teacher's L2 penalty and acceptance threshold without the pool's labels.

    Held-out predictions come from the validation split when given (probes fitted on all
    labeled images), else from stratified ``folds``-fold cross-validation on the labeled
    images (each image predicted by a probe that never saw it). The L2 penalty with the
    lowest held-out negative log-likelihood wins (calibration matters, since a threshold
    is applied to the confidence); the threshold is then
    :func:`choose_confidence_threshold` on its held-out predictions.

    Args:
        labeled_features: ``(N_l, D)`` features of the labeled images.
        labeled_labels: ``(N_l,)`` labels.
        num_classes: ``C``.
        val_features: ``(N_v, D)`` validation features, or None for cross-validation.
        val_labels: ``(N_v,)`` validation labels.
        l2_grid: Candidate penalties.
        thresholds: Candidate thresholds.
        target_precision: Held-out precision the threshold must reach.
        folds: Cross-validation folds (capped by the smallest class; at least 2 images per class).
        min_accepted: See :func:`choose_confidence_threshold`.
        seed: Seeds the fold assignment.

    Returns:
        The :class:`TeacherSelection`.
    """
    x = np.asarray(labeled_features, dtype=np.float32)
    y = np.asarray(labeled_labels).astype(np.int64)
    if not l2_grid:
        raise ValueError("l2_grid must not be empty")
    if (val_features is None) != (val_labels is None):
        raise ValueError("give both val_features and val_labels, or neither")
    if val_features is not None:
        held_y = np.asarray(val_labels).astype(np.int64)
        selected_on = "validation"

        def held_out(l2: float) -> np.ndarray:
            return fit_probe_teacher(x, y, np.asarray(val_features), num_classes, l2_reg=l2)
    else:
        smallest = int(np.bincount(y, minlength=num_classes)[np.unique(y)].min()) if len(y) else 0
        k = min(folds, smallest)
        if k < 2:
            raise ValueError(f"cross-validation needs >= 2 labeled images per class, the smallest class has {smallest}"
                             "; give validation data")
        parts = _folds(y, k, seed)
        held_y = y
        selected_on = "cross_validation"

        def held_out(l2: float) -> np.ndarray:
            out = np.zeros((len(y), num_classes), dtype=np.float32)
            for part in parts:
                train = np.setdiff1d(np.arange(len(y)), part)
                out[part] = fit_probe_teacher(x[train], y[train], x[part], num_classes, l2_reg=l2)
            return out

    scores, probs_of = [], {}
    for l2 in l2_grid:
        probs = held_out(float(l2))
        probs_of[float(l2)] = probs
        nll = float(-np.log(np.clip(probs[np.arange(len(held_y)), held_y], 1e-12, None)).mean())
        scores.append({"l2_reg": float(l2), "accuracy": float((probs.argmax(1) == held_y).mean()), "nll": nll})
    best = min(scores, key=lambda s: (s["nll"], -s["accuracy"]))
    threshold, precision, rate = choose_confidence_threshold(probs_of[best["l2_reg"]], held_y, thresholds,
                                                             target_precision=target_precision,
                                                             min_accepted=min_accepted)
    return TeacherSelection(best["l2_reg"], threshold, selected_on, len(held_y), precision, rate, scores)


def class_balanced_top(probs: np.ndarray, fraction: float) -> np.ndarray:
    """Indices of the most confident ``fraction`` of the pool, the same number per predicted class.

    Each class ``c`` keeps its ``max(1, round(fraction * N / C))`` most confident images among those
    predicted as ``c`` (fewer when fewer are predicted ``c``), as curriculum labeling's
    class-balanced selection (Cascante-Bonilla et al., AAAI 2021).

    Args:
        probs: ``(N, C)`` teacher probabilities.
        fraction: Share of the pool to keep, in (0, 1].

    Returns:
        Sorted pool indices.
    """
    if not 0.0 < fraction <= 1.0:
        raise ValueError(f"fraction must be in (0, 1], got {fraction}")
    probs = np.asarray(probs)
    n, c = probs.shape
    per_class = max(1, round(fraction * n / c))
    pred, conf = probs.argmax(1), probs.max(1)
    keep = []
    for k in range(c):
        members = np.flatnonzero(pred == k)
        keep.append(members[np.argsort(-conf[members], kind="stable")[:per_class]])
    return np.sort(np.concatenate(keep))


def curriculum_teacher(fit: Callable[[np.ndarray, np.ndarray, np.ndarray, int], np.ndarray],
                       labeled_features: np.ndarray, labeled_labels: np.ndarray, pool_features: np.ndarray,
                       num_classes: int, *, fractions: Sequence[float] = (0.2, 0.4, 0.6, 0.8)
                       ) -> tuple[np.ndarray, list[dict[str, float]]]:
    """Self-training rounds: refit the teacher on class-balanced top-q pseudo-labels, growing q.

    Round 0 fits ``fit`` on the labeled images; round ``r`` refits it, from scratch, on the
    labeled images plus the pool images :func:`class_balanced_top` keeps at
    ``fractions[r - 1]`` of the previous round's probabilities, labeled by their argmax
    (curriculum labeling, Cascante-Bonilla et al. 2021; refitting from scratch avoids
    confirmation bias).

    Args:
        fit: ``fit(features, labels, pool_features, num_classes) -> (N_u, C)`` probabilities,
            e.g. ``fit_probe_teacher`` with its L2 penalty bound, or ``label_propagation_teacher``.
        labeled_features: ``(N_l, D)``.
        labeled_labels: ``(N_l,)``.
        pool_features: ``(N_u, D)``.
        num_classes: ``C``.
        fractions: Increasing shares of the pool added in successive rounds.

    Returns:
        ``(probabilities of the last round (N_u, C), per-round log)``; the log holds each
        round's ``fraction`` and ``pseudo_labeled`` count (no accuracy: the pool's labels
        are not read).
    """
    if list(fractions) != sorted(fractions):
        raise ValueError(f"fractions must increase, got {list(fractions)}")
    x_l = np.asarray(labeled_features, dtype=np.float32)
    y_l = np.asarray(labeled_labels).astype(np.int64)
    pool = np.asarray(pool_features, dtype=np.float32)
    probs = fit(x_l, y_l, pool, num_classes)
    log = [{"round": 0, "fraction": 0.0, "pseudo_labeled": 0}]
    for r, fraction in enumerate(fractions, start=1):
        picked = class_balanced_top(probs, fraction)
        x = np.concatenate([x_l, pool[picked]])
        y = np.concatenate([y_l, probs[picked].argmax(1)])
        probs = fit(x, y, pool, num_classes)
        log.append({"round": r, "fraction": float(fraction), "pseudo_labeled": len(picked)})
    return probs, log


__all__ = [
    "DEFAULT_L2_GRID",
    "DEFAULT_THRESHOLDS",
    "TeacherSelection",
    "choose_confidence_threshold",
    "class_balanced_top",
    "curriculum_teacher",
    "ensemble_teacher",
    "fit_probe_teacher",
    "select_probe_teacher",
    "zero_shot_teacher",
]
