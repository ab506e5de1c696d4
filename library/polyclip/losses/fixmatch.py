"""FixMatch's unlabeled loss: cross-entropy on a strong view against confident weak-view labels."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class FixMatchLoss(nn.Module):
    """Masked cross-entropy between strong-view logits and hard pseudo-labels of the weak view.

    FixMatch (Sohn et al., 2020, eq. 4):

        l_u = 1 / (mu B) * sum_b 1[max(q_b) >= tau] * H(argmax(q_b), p(y | A(u_b)))

    with ``q_b = softmax(logits_weak_b)`` taken with no gradient, ``A`` the strong
    augmentation and the sum over all ``mu B`` unlabeled images (masked images count in the
    denominator, as in the paper). ``tau`` is one number or one threshold per class
    (class-aware thresholds: an image passes if its confidence reaches the threshold of
    its predicted class).

    Shapes:
        ``logits_weak``, ``logits_strong``: ``(N, C)``; ``threshold``: float or ``(C,)``.
        Returns ``(loss (), mask (N,) bool, pseudo_labels (N,) long)``.

    Example:
        >>> loss_fn = FixMatchLoss()
        >>> weak, strong = torch.tensor([[9.0, 0.0], [0.1, 0.0]]), torch.zeros(2, 2, requires_grad=True)
        >>> loss, mask, labels = loss_fn(weak, strong, 0.95)
        >>> mask.tolist(), labels.tolist()
        ([True, False], [0, 0])
    """

    def forward(self, logits_weak: torch.Tensor, logits_strong: torch.Tensor,
                threshold: float | torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        if logits_weak.shape != logits_strong.shape:
            raise ValueError(f"weak and strong logits differ in shape: {tuple(logits_weak.shape)} vs "
                             f"{tuple(logits_strong.shape)}")
        with torch.no_grad():
            confidence, pseudo = torch.softmax(logits_weak.detach().float(), dim=1).max(dim=1)
            tau = threshold[pseudo] if isinstance(threshold, torch.Tensor) else threshold
            mask = confidence >= tau
        per_image = F.cross_entropy(logits_strong, pseudo, reduction="none")
        return (per_image * mask).mean(), mask, pseudo


__all__ = ["FixMatchLoss"]
