"""DeViSE hinge rank loss between predicted embeddings and label vectors."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class HingeRankLoss(nn.Module):
    r"""Rank the true label's vector above every wrong label's by a cosine margin.

    From Frome et al., "DeViSE: A Deep Visual-Semantic Embedding Model" (NeurIPS 2013),
    with cosine similarity as the score:

    .. math::
        L(v, y) = \sum_{j \ne y} \max\big(0,\ \mathrm{margin} - \cos(v, t_y) + \cos(v, t_j)\big)

    where ``v`` is the image's predicted embedding and ``t_c`` the word vector of
    label ``c``. ``negatives="all"`` sums over every wrong label; ``negatives="sampled"``
    draws one random wrong label per example (from a seeded generator, so runs
    repeat), as the DeViSE paper did to keep the cost independent of the label count.
    The loss is averaged over the batch. Margin 0.1 is the paper's value (the Tiny-
    ImageNet report found 1 too loose and 0 unable to converge).

    Args:
        margin: The cosine margin.
        negatives: ``"all"`` or ``"sampled"``.
        seed: Seed of the generator drawing sampled negatives.

    Shapes:
        - embeddings: ``(B, D)`` predicted embeddings (any norm)
        - target: ``(B,)`` long label indices
        - label_vectors: ``(C, D)`` (any norm), ``C >= 2``
        - output: scalar

    Example:
        >>> loss_fn = HingeRankLoss(margin=0.1, negatives="all")
        >>> loss = loss_fn(torch.randn(4, 50), torch.tensor([0, 1, 2, 0]), torch.randn(3, 50))
    """

    def __init__(self, margin: float = 0.1, negatives: str = "all", seed: int = 0) -> None:
        super().__init__()
        if negatives not in {"all", "sampled"}:
            raise ValueError(f"negatives must be 'all' or 'sampled', got {negatives!r}")
        self.margin = margin
        self.negatives = negatives
        self.generator = torch.Generator().manual_seed(seed)

    def forward(self, embeddings: torch.Tensor, target: torch.Tensor, label_vectors: torch.Tensor) -> torch.Tensor:
        num_classes = label_vectors.shape[0]
        if num_classes < 2:
            raise ValueError("the hinge rank loss needs at least two labels")
        cos = F.normalize(embeddings, dim=1) @ F.normalize(label_vectors.to(embeddings.dtype), dim=1).T  # (B, C)
        positive = cos.gather(1, target[:, None])  # (B, 1)
        if self.negatives == "sampled":
            # An offset in [1, C) from the true label gives a uniform draw over the wrong labels.
            offset = torch.randint(1, num_classes, (len(target),), generator=self.generator).to(target.device)
            negative = cos.gather(1, ((target + offset) % num_classes)[:, None])
            return F.relu(self.margin - positive + negative).mean()
        hinge = F.relu(self.margin - positive + cos)
        wrong = torch.ones_like(hinge, dtype=torch.bool).scatter_(1, target[:, None], False)
        return (hinge * wrong).sum(dim=1).mean()

    def extra_repr(self) -> str:
        return f"margin={self.margin}, negatives={self.negatives!r}"
