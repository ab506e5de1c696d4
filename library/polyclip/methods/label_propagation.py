"""Transductive label propagation over a kNN graph of image features (a teacher for the pool).

Zhou et al., "Learning with Local and Global Consistency", NeurIPS 2004, as used for deep
semi-supervised learning by Iscen et al., "Label Propagation for Deep Semi-supervised
Learning", CVPR 2019:

1. L2-normalise the features (each backbone's separately, then their concatenation, so
   several backbones count alike) and link every image to its ``k`` nearest neighbours
   by cosine similarity, ``w_ij = max(s_ij, 0) ** gamma``; ``W <- W + W^T``.
2. Normalise ``A = D^-1/2 W D^-1/2`` and solve ``(I - alpha A) Z = Y`` with conjugate
   gradient, where ``Y`` holds the one-hot labels of the labeled images (zero rows for the
   others); ``Z`` spreads each label along the graph.
3. Row-normalise ``Z`` to probabilities, balance the classes (Sinkhorn-Knopp towards a
   class prior, or distribution alignment) and weight each image by its certainty
   ``1 - H(p) / log C`` (Iscen et al., eq. 11).

The kNN search runs in chunks of ``chunk_size`` queries on the features' device, so memory
is ``O(chunk_size * N + N * k)``, never ``O(N^2)``; the graph is a sparse matrix.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

BALANCES = ("sinkhorn", "distribution_alignment", "none")
FeatureInput = np.ndarray | torch.Tensor | Sequence[np.ndarray | torch.Tensor]


@dataclass(frozen=True)
class PropagationResult:
    """Output of :func:`label_propagation`.

    Attributes:
        probabilities: ``(N, C)`` float32 class probabilities of every image (labeled ones too).
        weights: ``(N,)`` float32 certainty ``1 - H(p) / log C`` in [0, 1].
    """

    probabilities: np.ndarray
    weights: np.ndarray


def combine_features(features: FeatureInput, device: torch.device | str | None = None) -> torch.Tensor:
    """L2-normalise each ``(N, D_b)`` array, concatenate, and normalise again (float32).

    Args:
        features: One array, or one per backbone with the same rows in the same order.
        device: Where the result lives (default: the first tensor's device, else CPU).

    Returns:
        ``(N, sum D_b)`` unit-norm rows; every backbone contributes equally to a cosine.
    """
    parts = [features] if isinstance(features, np.ndarray | torch.Tensor) else list(features)
    if not parts:
        raise ValueError("features: need at least one array")
    tensors = [torch.as_tensor(np.asarray(p) if isinstance(p, np.ndarray) else p) for p in parts]
    target = torch.device(device) if device is not None else tensors[0].device
    rows = {t.shape[0] for t in tensors}
    if len(rows) != 1 or any(t.ndim != 2 for t in tensors):
        shapes = [tuple(t.shape) for t in tensors]
        raise ValueError(f"features must be 2-d arrays with the same rows, got shapes {shapes}")
    unit = [F.normalize(t.to(target, torch.float32), dim=1) for t in tensors]
    return F.normalize(torch.cat(unit, dim=1), dim=1)


def knn(features: torch.Tensor, k: int, chunk_size: int = 1024) -> tuple[torch.Tensor, torch.Tensor]:
    """The ``k`` most similar other rows of each row, by dot product, in chunks.

    Args:
        features: ``(N, D)`` (unit rows for cosine similarity).
        k: Neighbours per row, ``1 <= k < N``.
        chunk_size: Query rows per chunk (peak memory ``chunk_size * N`` similarities).

    Returns:
        ``(indices (N, k) long, similarities (N, k))``, most similar first; a row is never
        its own neighbour.
    """
    n = features.shape[0]
    if not 1 <= k < n:
        raise ValueError(f"k must be in [1, {n - 1}] for {n} images, got {k}")
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    indices, sims = [], []
    for start in range(0, n, chunk_size):
        block = features[start : start + chunk_size] @ features.T  # (b, N)
        rows = torch.arange(block.shape[0], device=features.device)
        block[rows, rows + start] = -math.inf  # no self-loops
        top = block.topk(k, dim=1)
        indices.append(top.indices)
        sims.append(top.values)
    return torch.cat(indices), torch.cat(sims)


def normalized_adjacency(indices: torch.Tensor, similarities: torch.Tensor, gamma: float = 3.0) -> torch.Tensor:
    """Sparse ``D^-1/2 (W + W^T) D^-1/2`` of a kNN graph with ``w = max(s, 0) ** gamma``.

    Returns:
        ``(N, N)`` sparse COO tensor (coalesced), symmetric, on the inputs' device.
    """
    n, k = indices.shape
    rows = torch.arange(n, device=indices.device).repeat_interleave(k)
    cols = indices.reshape(-1)
    values = similarities.reshape(-1).clamp_min(0.0).pow(gamma)
    both_rows, both_cols = torch.cat([rows, cols]), torch.cat([cols, rows])
    weights = torch.sparse_coo_tensor(torch.stack([both_rows, both_cols]), torch.cat([values, values]), (n, n),
                                      check_invariants=False).coalesce()
    i, j = weights.indices()
    v = weights.values()
    degree = torch.zeros(n, device=v.device, dtype=v.dtype).index_add_(0, i, v)
    scale = degree.clamp_min(1e-12).rsqrt()
    return torch.sparse_coo_tensor(weights.indices(), v * scale[i] * scale[j], (n, n), check_invariants=False,
                                   is_coalesced=True)


def conjugate_gradient(adjacency: torch.Tensor, targets: torch.Tensor, alpha: float,
                       iterations: int = 20) -> torch.Tensor:
    """Solve ``(I - alpha A) Z = Y`` for every column of ``Y`` at once (fixed iterations, no host sync).

    ``I - alpha A`` is symmetric positive definite for a symmetric normalised ``A`` and
    ``0 < alpha < 1`` (eigenvalues of ``A`` lie in [-1, 1]), so CG converges.
    """
    z = torch.zeros_like(targets)
    r = targets.clone()
    p = r.clone()
    rs = (r * r).sum(0)
    tiny = torch.finfo(targets.dtype).tiny
    for _ in range(iterations):
        ap = p - alpha * torch.sparse.mm(adjacency, p)
        step = rs / (p * ap).sum(0).clamp_min(tiny)
        z = z + step * p
        r = r - step * ap
        rs_new = (r * r).sum(0)
        p = r + (rs_new / rs.clamp_min(tiny)) * p
        rs = rs_new
    return z


def sinkhorn_balance(probs: torch.Tensor, prior: torch.Tensor | None = None, iterations: int = 3) -> torch.Tensor:
    """Rescale class columns towards ``prior`` (Sinkhorn-Knopp), keeping rows normalised.

    After the last iteration every row sums to 1 and the column sums approach ``N * prior``.
    """
    n, c = probs.shape
    prior = torch.full((c,), 1.0 / c, device=probs.device, dtype=probs.dtype) if prior is None else prior
    p = probs.clamp_min(1e-12)
    for _ in range(iterations):
        p = p * (n * prior / p.sum(0))
        p = p / p.sum(1, keepdim=True)
    return p


def distribution_alignment(probs: torch.Tensor, prior: torch.Tensor | None = None) -> torch.Tensor:
    """ReMixMatch's alignment: ``normalize(p * prior / mean(p))`` (Berthelot et al. 2020)."""
    c = probs.shape[1]
    prior = torch.full((c,), 1.0 / c, device=probs.device, dtype=probs.dtype) if prior is None else prior
    p = probs.clamp_min(1e-12) * prior / probs.mean(0).clamp_min(1e-12)
    return p / p.sum(1, keepdim=True)


def certainty(probs: torch.Tensor) -> torch.Tensor:
    """``1 - H(p) / log C`` per row: 1 for a one-hot row, 0 for the uniform one."""
    c = probs.shape[1]
    entropy = -(probs * probs.clamp_min(1e-12).log()).sum(1)
    return (1.0 - entropy / math.log(c)).clamp(0.0, 1.0) if c > 1 else torch.ones_like(entropy)


def label_propagation(features: FeatureInput, labels: np.ndarray | torch.Tensor, num_classes: int, *,
                      k: int = 20, alpha: float = 0.99, gamma: float = 3.0, iterations: int = 20,
                      balance: str = "sinkhorn", prior: Sequence[float] | None = None, chunk_size: int = 1024,
                      device: torch.device | str | None = None) -> PropagationResult:
    """Propagate the known labels to every image over a kNN graph (see the module docstring).

    Args:
        features: ``(N, D)`` features of all images, or one array per backbone (concatenated).
        labels: ``(N,)`` class of each labeled image, ``-1`` for the unlabeled ones.
        num_classes: ``C``.
        k: Neighbours per image (Iscen et al.: 50 on CIFAR-10; smaller for small pools).
        alpha: Propagation strength in (0, 1) (0.99 in both papers).
        gamma: Similarity exponent (Iscen et al.: 3).
        iterations: Conjugate-gradient iterations (Iscen et al.: 20).
        balance: ``sinkhorn``, ``distribution_alignment`` or ``none``; applied to the unlabeled rows.
        prior: Class prior for the balancing (uniform if None).
        chunk_size: kNN query rows per chunk (memory ``chunk_size * N``).
        device: Where to compute (default: the features' device; CPU for numpy input).

    Returns:
        :class:`PropagationResult`; labeled rows keep their propagated (unbalanced) probabilities.
    """
    if not 0.0 < alpha < 1.0:
        raise ValueError(f"alpha must be in (0, 1), got {alpha}")
    if balance not in BALANCES:
        raise ValueError(f"balance must be one of {BALANCES}, got {balance!r}")
    if iterations < 1:
        raise ValueError(f"iterations must be >= 1, got {iterations}")
    x = combine_features(features, device)
    y = torch.as_tensor(np.asarray(labels) if isinstance(labels, np.ndarray) else labels).long().to(x.device)
    if y.shape != (x.shape[0],):
        raise ValueError(f"labels must be ({x.shape[0]},), one per image, got {tuple(y.shape)}")
    known = y >= 0
    if not bool(known.any()):
        raise ValueError("no labeled image (every label is -1)")
    if bool((y >= num_classes).any()) or bool((y < -1).any()):
        raise ValueError(f"labels must be -1 or in [0, {num_classes}), got range [{int(y.min())}, {int(y.max())}]")
    prior_t = None
    if prior is not None:
        prior_t = torch.as_tensor(prior, dtype=torch.float32, device=x.device)
        if prior_t.shape != (num_classes,) or bool((prior_t <= 0).any()):
            raise ValueError(f"prior must be {num_classes} positive values, got {list(prior)}")
        prior_t = prior_t / prior_t.sum()

    adjacency = normalized_adjacency(*knn(x, k, chunk_size), gamma=gamma)
    seeds = torch.zeros(x.shape[0], num_classes, device=x.device)
    seeds[known.nonzero().squeeze(1), y[known]] = 1.0
    z = conjugate_gradient(adjacency, seeds, alpha, iterations).clamp_min(0.0)
    totals = z.sum(1, keepdim=True)
    # An image the labels never reach (a separate component) gets the uniform distribution.
    probs = torch.where(totals > 0, z / totals.clamp_min(1e-30), torch.full_like(z, 1.0 / num_classes))
    unlabeled = ~known
    if balance != "none" and bool(unlabeled.any()):
        rows = probs[unlabeled]
        rows = sinkhorn_balance(rows, prior_t) if balance == "sinkhorn" else distribution_alignment(rows, prior_t)
        probs = probs.clone()
        probs[unlabeled] = rows
    return PropagationResult(probs.cpu().numpy().astype(np.float32), certainty(probs).cpu().numpy().astype(np.float32))


def label_propagation_teacher(labeled_features: FeatureInput, labeled_labels: np.ndarray, pool_features: FeatureInput,
                              num_classes: int, *, extra_features: FeatureInput | None = None,
                              **options: object) -> np.ndarray:
    """Class probabilities of the pool by label propagation from the labeled images.

    The teacher counterpart of :func:`polyclip.methods.teacher.fit_probe_teacher`: the graph
    holds the labeled images, the pool and, optionally, ``extra_features`` (e.g. the
    validation images, whose propagated labels then measure the teacher without touching
    the pool's labels; see :func:`propagate_with_validation`).

    Args:
        labeled_features: ``(N_l, D)`` features of the labeled images (or one per backbone).
        labeled_labels: ``(N_l,)`` their labels.
        pool_features: ``(N_u, D)`` features of the pool (same backbones).
        num_classes: ``C``.
        extra_features: More unlabeled nodes for the graph, left out of the result.
        **options: Passed to :func:`label_propagation` (``k``, ``alpha``, ``balance``...).

    Returns:
        ``(N_u, C)`` float32 probabilities.
    """
    probs, _ = _propagate_parts(labeled_features, labeled_labels, pool_features, num_classes, extra_features,
                                **options)
    return probs


def propagate_with_validation(labeled_features: FeatureInput, labeled_labels: np.ndarray, pool_features: FeatureInput,
                              val_features: FeatureInput, num_classes: int,
                              **options: object) -> tuple[np.ndarray, np.ndarray]:
    """One propagation over labeled + pool + validation images: ``(pool probs, val probs)``.

    The validation images are unlabeled nodes like the pool's, so their propagated labels
    are held-out predictions drawn like the pool's: pass them with the validation labels to
    :func:`polyclip.methods.teacher.choose_confidence_threshold` to pick the acceptance
    threshold.
    """
    return _propagate_parts(labeled_features, labeled_labels, pool_features, num_classes, val_features, **options)


def _parts(features: FeatureInput) -> list[np.ndarray | torch.Tensor]:
    return [features] if isinstance(features, np.ndarray | torch.Tensor) else list(features)


def _numpy(array: np.ndarray | torch.Tensor) -> np.ndarray:
    return array.detach().cpu().numpy() if isinstance(array, torch.Tensor) else np.asarray(array, dtype=np.float32)


def _propagate_parts(labeled: FeatureInput, labels: np.ndarray, pool: FeatureInput, num_classes: int,
                     extra: FeatureInput | None, **options: object) -> tuple[np.ndarray, np.ndarray]:
    groups = [_parts(labeled), _parts(pool)] + ([_parts(extra)] if extra is not None else [])
    if len({len(g) for g in groups}) != 1:
        raise ValueError(f"give the same backbones for every part, got {[len(g) for g in groups]} arrays")
    n_l, n_u = len(groups[0][0]), len(groups[1][0])
    y = np.asarray(labels).astype(np.int64)
    if len(y) != n_l:
        raise ValueError(f"need as many labeled features as labels, got {n_l} and {len(y)}")
    stacked = [np.concatenate([_numpy(g[b]) for g in groups]) for b in range(len(groups[0]))]
    all_labels = np.full(len(stacked[0]), -1, dtype=np.int64)
    all_labels[:n_l] = y
    result = label_propagation(stacked, all_labels, num_classes, **options)  # type: ignore[arg-type]
    return result.probabilities[n_l : n_l + n_u], result.probabilities[n_l + n_u :]


__all__ = [
    "BALANCES",
    "PropagationResult",
    "certainty",
    "combine_features",
    "conjugate_gradient",
    "distribution_alignment",
    "knn",
    "label_propagation",
    "label_propagation_teacher",
    "normalized_adjacency",
    "propagate_with_validation",
    "sinkhorn_balance",
]
