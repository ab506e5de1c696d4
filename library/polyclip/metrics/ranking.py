"""Ranking metrics: hit@k over ranked look-ups (DeViSE's "hit @ k")."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch


def hit_at_k(ranked: np.ndarray | torch.Tensor, targets: np.ndarray | torch.Tensor,
             ks: Sequence[int] = (1, 3, 5, 10)) -> dict[str, float]:
    """Share of queries whose target is among their first ``k`` ranked candidates.

    Works with ranked indices from any look-up, including an open vocabulary too
    large for a full score matrix (:meth:`polyclip.text.lookup.CosineLookup.topk`).

    Args:
        ranked: ``(N, K)`` candidate indices, best first.
        targets: ``(N,)`` target indices; a negative target (no such candidate, e.g. a
            label missing from the vocabulary) never counts as a hit.
        ks: Cut-offs; each must be at most ``K``.

    Returns:
        ``{"hit@1": ..., "hit@3": ..., ...}``.
    """
    ranked = np.asarray(ranked.cpu() if isinstance(ranked, torch.Tensor) else ranked)
    targets = np.asarray(targets.cpu() if isinstance(targets, torch.Tensor) else targets)
    if ranked.ndim != 2 or len(ranked) != len(targets):
        raise ValueError(f"ranked must be (N, K) with N = len(targets); got {ranked.shape} and {targets.shape}")
    hits = ranked == targets[:, None]
    out = {}
    for k in ks:
        if k > ranked.shape[1]:
            raise ValueError(f"hit@{k} needs at least {k} ranked candidates, got {ranked.shape[1]}")
        out[f"hit@{k}"] = float(hits[:, :k].any(axis=1).mean()) if len(targets) else float("nan")
    return out


def hit_at_k_from_scores(scores: np.ndarray | torch.Tensor, targets: np.ndarray | torch.Tensor,
                         ks: Sequence[int] = (1, 3, 5, 10)) -> dict[str, float]:
    """:func:`hit_at_k` from an ``(N, C)`` score matrix; cut-offs above ``C`` are capped at ``C``."""
    scores_t = torch.as_tensor(np.asarray(scores) if not isinstance(scores, torch.Tensor) else scores)
    kmax = min(max(ks), scores_t.shape[1])
    ranked = scores_t.topk(kmax, dim=1).indices
    capped = {k: min(k, kmax) for k in ks}
    inner = hit_at_k(ranked, targets, sorted(set(capped.values())))
    return {f"hit@{k}": inner[f"hit@{capped[k]}"] for k in ks}


__all__ = ["hit_at_k", "hit_at_k_from_scores"]
