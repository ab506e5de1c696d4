"""Teachers that label an unlabeled pool: a probe on features, CLIP zero-shot, an ensemble.

Each returns class probabilities ``(N, C)`` for the pool (float32 numpy); the driver then
keeps the labels above a confidence threshold (:mod:`polyclip.methods.pseudo_label`).
Features come from any ``create_backbone`` spec, so a trained polyclip checkpoint is a
teacher through ``checkpoint:<run dir>`` (its encoder, with a probe fitted on the labeled
images).
"""

from __future__ import annotations

from collections.abc import Sequence

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


__all__ = ["ensemble_teacher", "fit_probe_teacher", "zero_shot_teacher"]
