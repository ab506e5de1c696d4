"""Linear or MLP probe on frozen (cached) features."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def mlp_head(in_features: int, num_classes: int, hidden: int = 0, depth: int = 1, dropout: float = 0.0) -> nn.Module:
    """A linear layer (``depth=1``) or an MLP with ``depth - 1`` hidden layers of width ``hidden``."""
    if depth <= 1 or hidden <= 0:
        return nn.Linear(in_features, num_classes)
    layers: list[nn.Module] = []
    width = in_features
    for _ in range(depth - 1):
        layers += [nn.Linear(width, hidden), nn.ReLU(inplace=True)]
        if dropout:
            layers.append(nn.Dropout(dropout))
        width = hidden
    layers.append(nn.Linear(width, num_classes))
    return nn.Sequential(*layers)


class ProbeTask(nn.Module):
    """Classify frozen features with a linear layer or an MLP.

    Args:
        in_features: Feature dimension ``D``.
        num_classes: ``C``.
        hidden: Hidden width (MLP only).
        depth: Number of linear layers (1 = linear probe).
        dropout: Dropout after each hidden layer.
        l2_normalize: L2-normalise features first (robust across backbones' scales).
        loss_fn: ``(logits, y) -> loss``; cross-entropy by default.

    Batch: ``x`` float ``(B, D)``, ``y`` long ``(B,)``.
    """

    def __init__(self, in_features: int, num_classes: int, *, hidden: int = 0, depth: int = 1,
                 dropout: float = 0.0, l2_normalize: bool = True, loss_fn: nn.Module | None = None) -> None:
        super().__init__()
        self.head = mlp_head(in_features, num_classes, hidden, depth, dropout)
        self.l2_normalize = l2_normalize
        self.loss_fn = loss_fn or nn.CrossEntropyLoss()

    def predict(self, x: torch.Tensor) -> torch.Tensor:
        x = x.float()
        if self.l2_normalize:
            x = F.normalize(x, dim=1)
        return self.head(x)

    def forward(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        logits = self.predict(batch["x"])
        loss = self.loss_fn(logits, batch["y"])
        acc = (logits.argmax(1) == batch["y"]).float().mean()
        return {"loss": loss, "acc": acc.detach()}
