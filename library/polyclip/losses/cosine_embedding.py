"""Cosine embedding loss: pull a predicted embedding towards its label's vector."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class CosineEmbeddingLoss(nn.Module):
    r"""One minus the cosine between the predicted embedding and the true label's vector.

    The first of the two DeViSE losses compared in the Tiny-ImageNet DeViSE report:

    .. math::
        L(v, y) = 1 - \cos(v, t_y)

    averaged over the batch. It only pulls towards the true label and never pushes
    away from the wrong ones; the report found :class:`HingeRankLoss`-style ranking
    trains better.

    Shapes:
        - embeddings: ``(B, D)`` predicted embeddings
        - target: ``(B,)`` long label indices
        - label_vectors: ``(C, D)``
        - output: scalar

    Example:
        >>> loss_fn = CosineEmbeddingLoss()
        >>> loss = loss_fn(torch.randn(4, 50), torch.tensor([0, 1, 2, 0]), torch.randn(3, 50))
    """

    def forward(self, embeddings: torch.Tensor, target: torch.Tensor, label_vectors: torch.Tensor) -> torch.Tensor:
        true_vectors = label_vectors.to(embeddings.dtype)[target]
        return (1.0 - F.cosine_similarity(embeddings, true_vectors, dim=1)).mean()
