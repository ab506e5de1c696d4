"""Class-aware adaptive confidence thresholds (Lucas et al., 2022, "Barely-supervised learning").

A fixed threshold (FixMatch's 0.95) lets easy classes flood the pseudo-labels while hard
classes never pass. Here every class ``c`` has its own threshold ``tau_c``, nudged after
each step towards the class prior ``r_c`` (the paper's section on class-aware thresholds):

    p_c   <- alpha * p_c + (1 - alpha) * n_c / B
    tau_c <- clip(tau_c + eps * sign(p_c - r_c), tau_min, tau_max)

where ``n_c`` counts the unlabeled images of the batch confidently pseudo-labeled as ``c``
and ``B`` is the number of unlabeled images in the batch: ``p_c`` is, as in the paper, "the
proportion of images that are confidently labeled into class c among all images", not the
share of ``c`` among the accepted ones. So ``sum_c p_c <= 1 = sum_c r_c``: while some images
are rejected, the thresholds keep drifting down until the accepted images cover the pool
in the prior's proportions, and an over-represented class (``p_c > r_c``) gets stricter.
When a step accepts nothing, ``p`` decays and every threshold drops: the thresholds cannot
stall with nothing accepted.

Under DDP the counts and ``B`` are summed over all workers before the update (on the
training device, through :func:`polyclip.distributed.all_reduce`), so every worker holds the
same thresholds.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from polyclip.distributed import all_reduce


class ClassAwareThreshold(nn.Module):
    """Per-class confidence thresholds updated from the share of images accepted per class.

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

        Everything stays on the batch's device (no host sync); under DDP every worker must
        call this at the same step (it all-reduces the counts there).
        """
        if labels.shape != mask.shape or labels.ndim != 1:
            raise ValueError(f"labels and mask must both be (B,); got {tuple(labels.shape)} and {tuple(mask.shape)}")
        # counts[:C] = n_c, counts[C] = B; index_add_ rather than bincount, whose output size
        # depends on the data and costs a host sync on CUDA.
        counts = torch.zeros(self.num_classes + 1, dtype=self.p.dtype, device=labels.device)
        counts[: self.num_classes].index_add_(0, labels.long(), mask.to(counts.dtype))
        counts[self.num_classes].fill_(float(mask.numel()))
        all_reduce(counts, expected=self.p.device)  # the thresholds live on the training device
        batch_share = counts[: self.num_classes] / counts[self.num_classes].clamp(min=1.0)
        self.p.mul_(self.alpha).add_(batch_share, alpha=1.0 - self.alpha)
        self.tau.add_(self.eps * torch.sign(self.p - self.prior)).clamp_(self.tau_min, self.tau_max)

__all__ = ["ClassAwareThreshold"]
