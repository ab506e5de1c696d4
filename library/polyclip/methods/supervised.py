"""Supervised training of a backbone and a classifier head, end to end."""

from __future__ import annotations

import torch
from torch import nn

from polyclip.backbones.base import Backbone
from polyclip.methods.probe import mlp_head


class SupervisedTask(nn.Module):
    """Fine-tune (or train from scratch) a backbone with a classification head.

    Args:
        backbone: The encoder; trained unless ``freeze_backbone``.
        num_classes: ``C``.
        loss_fn: ``(logits, y) -> loss``; cross-entropy by default (CES plugs in here).
        augment: Batch augmentation on [0, 1] images, applied in training only.
        freeze_backbone: Train only the head (a linear probe on live features).
        head_hidden: Hidden width of an MLP head (0 = linear).
        head_depth: Linear layers in the head.

    Batch: ``x`` ``uint8 (B, C, H, W)``, ``y`` long ``(B,)``.
    """

    def __init__(self, backbone: Backbone, num_classes: int, *, loss_fn: nn.Module | None = None,
                 augment: nn.Module | None = None, freeze_backbone: bool = False, head_hidden: int = 0,
                 head_depth: int = 1) -> None:
        super().__init__()
        self.backbone = backbone
        self.head = mlp_head(backbone.num_features, num_classes, head_hidden, head_depth)
        self.loss_fn = loss_fn or nn.CrossEntropyLoss()
        self.augment = augment
        if isinstance(augment, nn.Module):  # sampled, never trained (DDP waits for trainable parameters)
            augment.requires_grad_(False)
        self.freeze_backbone = freeze_backbone
        if freeze_backbone:
            backbone.requires_grad_(False)

    def train(self, mode: bool = True) -> SupervisedTask:
        super().train(mode)
        if self.freeze_backbone:
            self.backbone.eval()  # frozen BatchNorm statistics stay frozen
        return self

    def features(self, images: torch.Tensor) -> torch.Tensor:
        x = self.backbone.to_unit(images)
        if self.training and self.augment is not None:
            x = self.augment(x)
        return self.backbone.forward_features(self.backbone.normalize(x))

    def predict(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))

    def forward(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        logits = self.predict(batch["x"])
        loss = self.loss_fn(logits, batch["y"])
        return {"loss": loss, "acc": (logits.argmax(1) == batch["y"]).float().mean().detach()}
