"""Class-aware adaptive confidence thresholds (Lucas et al., 2021, "Barely-supervised learning").

A fixed threshold (FixMatch's 0.95) lets easy classes flood the pseudo-labels while hard
classes never pass. Here every class ``c`` has its own threshold ``tau_c``, nudged after
each step towards the class prior ``r_c``:

    p_c   <- alpha * p_c + (1 - alpha) * n_c / max(sum_k n_k, 1)
    tau_c <- clip(tau_c + eps * sign(p_c - r_c), tau_min, tau_max)

where ``n_c`` counts the images of the batch confidently pseudo-labeled as ``c``. An
over-represented class (``p_c > r_c``) gets stricter, an under-represented one more
lenient. When a step accepts nothing, every ``n_c / max(sum, 1)`` is 0, so ``p`` decays and
every threshold drops: the thresholds cannot stall with nothing accepted.

Under DDP the counts are summed over all workers (``torch.distributed.all_reduce``) before
the update, so every worker holds the same thresholds.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.distributed as dist
from torch import nn


def distributed_sum_(tensor: torch.Tensor) -> torch.Tensor:
    """Sum ``tensor`` in place over all workers when ``torch.distributed`` is initialised."""
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


class ClassAwareThreshold(nn.Module):
    """Per-class confidence thresholds updated from the share of accepted pseudo-labels.

    Args:
        num_classes: ``C``.
        init: Initial threshold of every class (FixMatch's 0.95).
        alpha: Momentum of the running class shares ``p`` (paper: 0.9).
        eps: Step of each threshold update (paper: 0.001).
        prior: Class prior ``r`` (``C`` non-negative numbers, normalised here); uniform if None.
        tau_min: Lowest threshold allowed.
        tau_max: Highest threshold allowed.

    Buffers (checkpointed with the owner): ``tau (C,)``, ``p (C,)`` (starts at the prior),
    ``prior (C,)``.

    Example:
        >>> thresholds = ClassAwareThreshold(3, init=0.9)
        >>> probs = torch.tensor([[0.95, 0.03, 0.02], [0.5, 0.3, 0.2]])
        >>> mask, labels = thresholds.accept(probs)
        >>> mask.tolist(), labels.tolist()
        ([True, False], [0, 0])
        >>> thresholds.update(labels, mask)
    """

    tau: torch.Tensor
    p: torch.Tensor
    prior: torch.Tensor

    def __init__(self, num_classes: int, *, init: float = 0.95, alpha: float = 0.9, eps: float = 0.001,
                 prior: Sequence[float] | torch.Tensor | None = None, tau_min: float = 0.0,
                 tau_max: float = 1.0) -> None:
        super().__init__()
        if num_classes < 1:
            raise ValueError(f"num_classes must be >= 1, got {num_classes}")
        if not 0.0 <= alpha < 1.0:
            raise ValueError(f"alpha must be in [0, 1), got {alpha}")
        if eps < 0:
            raise ValueError(f"eps must be >= 0, got {eps}")
        if not tau_min <= init <= tau_max:
            raise ValueError(f"init threshold {init} must lie in [tau_min={tau_min}, tau_max={tau_max}]")
        if prior is None:
            r = torch.full((num_classes,), 1.0 / num_classes)
        else:
            r = torch.as_tensor(prior, dtype=torch.float32).flatten()
            if r.numel() != num_classes or bool((r < 0).any()) or float(r.sum()) <= 0:
                raise ValueError(f"prior must hold {num_classes} non-negative numbers with a positive sum, "
                                 f"got {r.tolist()}")
            r = r / r.sum()
        self.num_classes, self.alpha, self.eps = num_classes, alpha, eps
        self.tau_min, self.tau_max = tau_min, tau_max
        self.register_buffer("tau", torch.full((num_classes,), float(init)))
        self.register_buffer("p", r.clone())
        self.register_buffer("prior", r.clone())

    @torch.no_grad()
    def accept(self, probs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Which predictions pass their class's threshold.

        Args:
            probs: ``(B, C)`` class probabilities.

        Returns:
            ``(mask (B,) bool, labels (B,) long)``: ``max_c probs >= tau[argmax]`` and the argmax.
        """
        confidence, labels = probs.max(dim=1)
        return confidence >= self.tau[labels], labels

    @torch.no_grad()
    def update(self, labels: torch.Tensor, mask: torch.Tensor) -> None:
        """One update from a batch's pseudo-labels ``(B,)`` and acceptance mask ``(B,)``.

        Under DDP every worker must call this at the same step (it all-reduces the counts).
        """
        counts = torch.bincount(labels[mask], minlength=self.num_classes).to(self.p.dtype)
        distributed_sum_(counts)
        batch_share = counts / counts.sum().clamp(min=1.0)
        self.p.mul_(self.alpha).add_(batch_share, alpha=1.0 - self.alpha)
        self.tau.add_(self.eps * torch.sign(self.p - self.prior)).clamp_(self.tau_min, self.tau_max)


__all__ = ["ClassAwareThreshold", "distributed_sum_"]
