"""SimCLR pretraining with an online linear probe.

Chen et al. 2020, "A Simple Framework for Contrastive Learning of Visual Representations":
two augmented views of each unlabeled image go through the encoder and an MLP projection
head; NT-Xent pulls the two views together and pushes away every other image of the
(cluster-wide) batch. The projection head is discarded afterwards; the encoder is the
product.

A pretraining run has no classifier, yet every job reports validation and test accuracy.
So, as in solo-learn, a linear probe trains *online* on the labeled stream, on encoder
features with stopped gradients: it never shapes the encoder (no label leaks into the
representation) and it tracks how linearly separable the features are, epoch by epoch.
``predict`` returns its logits.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from polyclip.augment.simclr import simclr_views
from polyclip.backbones.base import Backbone
from polyclip.losses.ntxent import NTXentLoss


def projection_head(in_features: int, hidden: int, out_features: int) -> nn.Sequential:
    """SimCLR's projection ``g``: Linear -> BatchNorm -> ReLU -> Linear (one hidden layer).

    Args:
        in_features: Encoder features ``D``.
        hidden: Hidden width (SimCLR uses ``D``).
        out_features: Projection dimension (SimCLR uses 128).
    """
    return nn.Sequential(
        nn.Linear(in_features, hidden, bias=False),
        nn.BatchNorm1d(hidden),
        nn.ReLU(inplace=True),
        nn.Linear(hidden, out_features),
    )


class SimCLRTask(nn.Module):
    """SimCLR on the unlabeled stream plus an online linear probe on the labeled one.

    Args:
        backbone: The trainable encoder (its ``spec`` and preprocessing are exported).
        num_classes: Classes of the online probe.
        augment: View augmentation on [0, 1] images at the backbone's size (see
            :func:`polyclip.augment.simclr.simclr_augment`).
        projection_hidden: Hidden width of the projection head (0: ``backbone.num_features``).
        projection_dim: Output width of the projection head.
        temperature: NT-Xent ``tau``.
        gather_negatives: Gather negatives from every DDP worker.
        probe_weight: Weight of the probe's cross-entropy in the returned loss; it only
            reaches the probe's parameters, so it never changes the encoder's updates.

    Batch: ``u_x`` ``uint8 (B, C, H, W)`` unlabeled images; ``x`` ``uint8`` and ``y``
    long labeled images for the probe.

    Example:
        >>> task = SimCLRTask(create_backbone("random:small_cnn"), 10, simclr_augment(28, "small"))  # doctest: +SKIP
        >>> out = task({"u_x": images, "x": labeled, "y": labels})  # {"loss", "ntxent", "probe_loss", ...}
    """

    def __init__(self, backbone: Backbone, num_classes: int, augment: nn.Module, *, projection_hidden: int = 0,
                 projection_dim: int = 128, temperature: float = 0.5, gather_negatives: bool = True,
                 probe_weight: float = 1.0) -> None:
        super().__init__()
        if num_classes < 2:
            raise ValueError(f"the online probe needs at least 2 classes, got {num_classes}")
        if projection_dim < 1 or projection_hidden < 0:
            raise ValueError(f"bad projection head: hidden={projection_hidden}, dim={projection_dim}")
        self.backbone = backbone
        self.augment = augment
        if isinstance(augment, nn.Module):  # sampled, never trained (DDP waits for trainable parameters)
            augment.requires_grad_(False)
        self.projector = projection_head(backbone.num_features, projection_hidden or backbone.num_features,
                                         projection_dim)
        self.probe = nn.Linear(backbone.num_features, num_classes)
        self.loss_fn = NTXentLoss(temperature, gather_negatives=gather_negatives)
        self.probe_weight = probe_weight

    def embed(self, images: torch.Tensor) -> torch.Tensor:
        """Encoder features of raw images, without augmentation: ``(B, D)``."""
        return self.backbone.forward_features(self.backbone.normalize(self.backbone.to_unit(images)))

    def predict(self, x: torch.Tensor) -> torch.Tensor:
        """Online-probe logits ``(B, num_classes)`` of raw images."""
        return self.probe(self.embed(x))

    def contrastive_loss(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """NT-Xent of two random views of ``images``; also the views' mean cosine similarity."""
        v1, v2 = simclr_views(self.backbone.to_unit(images), self.augment)
        # One forward for both views, so BatchNorm normalises over the whole 2N batch.
        h = self.backbone.forward_features(self.backbone.normalize(torch.cat([v1, v2])))
        z1, z2 = self.projector(h).chunk(2)
        loss = self.loss_fn(z1, z2)
        return loss, F.cosine_similarity(z1, z2).mean().detach()

    def forward(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        ntxent, positive_cos = self.contrastive_loss(batch["u_x"])
        with torch.no_grad():
            feats = self.embed(batch["x"])
        logits = self.probe(feats)
        probe_loss = F.cross_entropy(logits, batch["y"])
        return {
            "loss": ntxent + self.probe_weight * probe_loss,
            "ntxent": ntxent.detach(),
            "positive_cos": positive_cos,
            "probe_loss": probe_loss.detach(),
            "probe_acc": (logits.argmax(1) == batch["y"]).float().mean().detach(),
        }
