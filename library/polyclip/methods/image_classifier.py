"""A backbone and a classification head over [0, 1] images, shared by the semi-supervised tasks."""

from __future__ import annotations

import torch
from torch import nn

from polyclip.backbones.base import Backbone
from polyclip.methods.probe import mlp_head


class ImageClassifier(nn.Module):
    """``logits = head(backbone.forward_features(backbone.normalize(x)))``.

    Kept as one module so an EMA copy (:class:`polyclip.methods.ema.ModelEma`) averages the
    encoder and the head together.

    Args:
        backbone: The encoder.
        num_classes: ``C``.
        head_hidden: Hidden width of an MLP head (0 = linear).
        head_depth: Linear layers in the head.

    Shapes:
        ``(B, C_in, S, S)`` float in [0, 1] at the backbone's size -> ``(B, num_classes)``.
    """

    def __init__(self, backbone: Backbone, num_classes: int, *, head_hidden: int = 0, head_depth: int = 1) -> None:
        super().__init__()
        self.backbone = backbone
        self.head = mlp_head(backbone.num_features, num_classes, head_hidden, head_depth)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.backbone.forward_features(self.backbone.normalize(x)))  # type: ignore[no-any-return]


__all__ = ["ImageClassifier"]
