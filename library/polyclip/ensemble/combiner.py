"""The adaptive backbone combiner of Rodriguez-Opazo et al. 2024.

"Synergy and Diversity in CLIP: Enhancing Performance Through Adaptive Backbone
Ensembling" (arXiv:2405.17139): a small MLP reads the features of every backbone for an
image and outputs one positive temperature per backbone; the ensemble logits are

    ``logits = sum_b z_b / t_b``         (``combine="divide"``, the paper's form)
    ``logits = sum_b z_b * w_b``         (``combine="multiply"``)

where ``z_b`` are backbone ``b``'s head logits. It is trained with cross-entropy on as few
as one labeled image per class while the heads stay frozen.

Choices the paper leaves open, all configurable and recorded in the artifact:

* ``positivity``: ``softplus(s) + eps`` (default, gradients do not explode for large
  ``s``) or ``exp(s) + eps``.
* ``feature_norm``: ``"l2"`` normalises each backbone's features before concatenation
  (default; backbones' feature scales differ by orders of magnitude) or ``"none"``.
* Initialisation: the output layer's weights are zero and its bias is set so every
  temperature starts at ``n_backbones`` (``divide``) or every weight at ``1 / n_backbones``
  (``multiply``). The untrained combiner therefore *is* logit averaging, and training
  starts from that baseline.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

COMBINE_MODES = ("divide", "multiply")
POSITIVITY = ("softplus", "exp")
FEATURE_NORMS = ("l2", "none")


def _check_choice(name: str, value: str, valid: tuple[str, ...]) -> None:
    if value not in valid:
        raise ValueError(f"unknown {name} {value!r}; valid: {', '.join(valid)}")


class TemperatureCombiner(nn.Module):
    """MLP mapping concatenated backbone features to one positive scale per backbone.

    Args:
        feature_dims: Feature dimension of each backbone, in cost order.
        hidden: Width of the single hidden layer (128 in the paper).
        combine: ``"divide"`` (``z / t``) or ``"multiply"`` (``z * w``).
        positivity: ``"softplus"`` or ``"exp"``, applied to the MLP output.
        feature_norm: ``"l2"`` (per backbone, before concatenation) or ``"none"``.
        eps: Added after the positivity map so a temperature never reaches zero.

    Shapes:
        features: list of ``n`` tensors ``(B, D_b)``; logits: list of ``n`` tensors ``(B, C)``;
        output: ``(B, C)`` ensemble logits and ``(B, n)`` normalised backbone weights.

    Example:
        >>> comb = TemperatureCombiner([4, 6])
        >>> feats, logits = [torch.randn(3, 4), torch.randn(3, 6)], [torch.randn(3, 5)] * 2
        >>> torch.allclose(comb(feats, logits)[0], (logits[0] + logits[1]) / 2, atol=1e-5)
        True
    """

    def __init__(self, feature_dims: Sequence[int], *, hidden: int = 128, combine: str = "divide",
                 positivity: str = "softplus", feature_norm: str = "l2", eps: float = 1e-3) -> None:
        super().__init__()
        _check_choice("combine", combine, COMBINE_MODES)
        _check_choice("positivity", positivity, POSITIVITY)
        _check_choice("feature_norm", feature_norm, FEATURE_NORMS)
        n = len(feature_dims)
        if n < 1:
            raise ValueError("the combiner needs at least one backbone")
        self.feature_dims = [int(d) for d in feature_dims]
        self.combine = combine
        self.positivity = positivity
        self.feature_norm = feature_norm
        self.eps = float(eps)
        self.hidden = int(hidden)
        self.mlp = nn.Sequential(nn.Linear(sum(self.feature_dims), hidden), nn.ReLU(), nn.Linear(hidden, n))
        initial = float(n) if combine == "divide" else 1.0 / n
        if initial <= self.eps:
            raise ValueError(f"eps={eps} must be below the initial scale {initial}")
        last = self.mlp[2]
        assert isinstance(last, nn.Linear)
        with torch.no_grad():
            # Zero output weights: every image starts with the same scales (= logit averaging).
            last.weight.zero_()
            last.bias.fill_(self._inverse_positivity(initial - self.eps))

    @property
    def num_backbones(self) -> int:
        return len(self.feature_dims)

    def _inverse_positivity(self, value: float) -> float:
        if self.positivity == "exp":
            return math.log(value)
        return value + math.log(-math.expm1(-value))  # inverse softplus, stable for large values

    def config(self) -> dict[str, object]:
        """The constructor arguments (JSON-serialisable), for the artifact."""
        return {"feature_dims": list(self.feature_dims), "hidden": self.hidden, "combine": self.combine,
                "positivity": self.positivity, "feature_norm": self.feature_norm, "eps": self.eps}

    def scales(self, features: Sequence[torch.Tensor]) -> torch.Tensor:
        """Per-image positive scales ``(B, n)``: temperatures (``divide``) or weights (``multiply``)."""
        if len(features) != self.num_backbones:
            raise ValueError(f"combiner expects features of {self.num_backbones} backbones, got {len(features)}")
        parts = []
        for b, (x, dim) in enumerate(zip(features, self.feature_dims)):
            if x.ndim != 2 or x.shape[1] != dim:
                raise ValueError(f"backbone {b}: expected features (B, {dim}), got {tuple(x.shape)}")
            x = x.float()
            parts.append(F.normalize(x, dim=1) if self.feature_norm == "l2" else x)
        raw = self.mlp(torch.cat(parts, dim=1))
        positive = torch.exp(raw) if self.positivity == "exp" else F.softplus(raw)
        return positive + self.eps

    def forward(self, features: Sequence[torch.Tensor],
                logits: Sequence[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """Combine per-backbone head logits adaptively.

        Returns:
            ``(ensemble_logits (B, C), weights (B, n))``. ``weights`` are the relative
            multipliers of each backbone's logits, normalised to sum to one per image:
            ``(1 / t_b) / sum_k (1 / t_k)`` for ``divide``, ``w_b / sum_k w_k`` for ``multiply``.
        """
        if len(logits) != self.num_backbones:
            raise ValueError(f"combiner expects logits of {self.num_backbones} backbones, got {len(logits)}")
        scales = self.scales(features)
        multipliers = 1.0 / scales if self.combine == "divide" else scales
        stacked = torch.stack([z.float() for z in logits], dim=1)  # (B, n, C)
        combined = (stacked * multipliers.unsqueeze(-1)).sum(dim=1)
        return combined, multipliers / multipliers.sum(dim=1, keepdim=True)


def train_combiner(
    combiner: TemperatureCombiner,
    features: Sequence[torch.Tensor],
    logits: Sequence[torch.Tensor],
    labels: torch.Tensor,
    *,
    steps: int = 500,
    lr: float = 2e-4,
    weight_decay: float = 0.01,
    batch_size: int | None = None,
    seed: int = 0,
) -> list[float]:
    """Fit the combiner with cross-entropy while the heads (``logits``) stay fixed.

    Adam (``torch.optim.Adam``, whose ``weight_decay`` is an L2 term in the gradient),
    lr ``2e-4`` and weight decay ``0.01`` as in the paper.

    Args:
        combiner: Modified in place.
        features: ``n`` tensors ``(N, D_b)`` of the combiner's training images.
        logits: ``n`` tensors ``(N, C)``, the frozen heads' logits for those images.
        labels: ``(N,)`` labels.
        steps: Optimiser steps.
        lr: Adam learning rate.
        weight_decay: Adam weight decay.
        batch_size: Images per step; ``None`` for full batch (the few-label case).
        seed: Seeds the mini-batch order.

    Returns:
        The training loss of every step.
    """
    n = labels.shape[0]
    if n == 0:
        raise ValueError("the combiner needs at least one labeled image")
    feats = [f.detach().float() for f in features]
    zs = [z.detach().float() for z in logits]
    y = labels.long()
    optimizer = torch.optim.Adam(combiner.parameters(), lr=lr, weight_decay=weight_decay)
    generator = torch.Generator().manual_seed(seed)
    combiner.train()
    losses: list[float] = []
    order = torch.randperm(n, generator=generator)
    cursor = 0
    for _ in range(steps):
        if batch_size is None or batch_size >= n:
            idx = torch.arange(n)
        else:
            if cursor + batch_size > n:
                order, cursor = torch.randperm(n, generator=generator), 0
            idx = order[cursor:cursor + batch_size]
            cursor += batch_size
        out, _ = combiner([f[idx] for f in feats], [z[idx] for z in zs])
        loss = F.cross_entropy(out, y[idx])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(float(loss.detach()))
    combiner.eval()
    if losses and not np.isfinite(losses[-1]):
        raise FloatingPointError(f"combiner training diverged (loss {losses[-1]})")
    return losses
