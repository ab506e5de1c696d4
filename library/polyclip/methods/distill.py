"""Distillation from a teacher's embeddings into a student encoder, with a classifier on top.

After "CLIP Student" in "Integrating Contrastive Language-Image Pretraining and Natural
Language Similarity towards Robust Classification" (Tiny-ImageNet): a ResNet-18 with an
extra linear layer to CLIP's 512-d embedding, trained jointly to reproduce CLIP's image
embeddings (cosine) and to classify through a 4-layer MLP (hidden 256).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from polyclip.backbones.base import Backbone
from polyclip.methods.probe import mlp_head


class DistillTask(nn.Module):
    r"""Student encoder -> linear to the teacher's dimension -> MLP classifier.

    .. math::
        L = w_{cos}\,\frac{1}{B}\sum_i \big(1 - \cos(s_i, t_i)\big)
            + w_{ce}\,\mathrm{CE}\big(\mathrm{MLP}(s), y\big)

    with ``s_i = W f(x_i) + b`` the student embedding of image ``x_i`` and ``t_i`` the
    teacher's (cached) embedding. The teacher is a fixed target: no gradient reaches it.
    The cross-entropy gradient flows through the MLP into the student, so the features
    are tuned for the task as well as pulled towards the teacher's.

    An optional unlabeled stream (batch keys ``u_x``, ``u_teacher``) adds the cosine term
    on more images (labels are not needed to imitate a teacher), averaged with the
    labeled one over all images of the step.

    Args:
        student_backbone: The encoder trained from the images (exported as ``.backbone``).
        teacher_dim: Dimension ``D_t`` of the teacher's embeddings.
        num_classes: ``C``.
        w_cos: Weight of the cosine term.
        w_ce: Weight of the cross-entropy term.
        mlp_hidden: Hidden width of the classifier.
        mlp_depth: Linear layers of the classifier (4 in the paper).

    Batch: ``x`` ``uint8 (B, C, H, W)``, ``y`` long ``(B,)``, ``teacher`` float ``(B, D_t)``;
    optionally ``u_x``, ``u_teacher``.

    Example:
        >>> student = create_backbone("random:small_cnn@8")  # doctest: +SKIP
        >>> task = DistillTask(student, teacher_dim=1280, num_classes=10, w_cos=1.0, w_ce=1.0)  # doctest: +SKIP
    """

    def __init__(self, student_backbone: Backbone, teacher_dim: int, num_classes: int, w_cos: float, w_ce: float,
                 mlp_hidden: int = 256, mlp_depth: int = 4) -> None:
        super().__init__()
        if teacher_dim <= 0 or num_classes <= 1:
            raise ValueError(f"need teacher_dim > 0 and num_classes > 1, got {teacher_dim} and {num_classes}")
        if w_cos < 0 or w_ce < 0 or w_cos + w_ce == 0:
            raise ValueError(f"weights must be >= 0 and not both 0, got w_cos={w_cos}, w_ce={w_ce}")
        self.backbone = student_backbone
        self.project = nn.Linear(student_backbone.num_features, teacher_dim)
        self.classifier = mlp_head(teacher_dim, num_classes, mlp_hidden, mlp_depth)
        self.w_cos = w_cos
        self.w_ce = w_ce

    def embed(self, images: torch.Tensor) -> torch.Tensor:
        """Student embeddings ``(B, teacher_dim)`` of raw images."""
        return self.project(self.backbone.encode(images))

    def predict(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.embed(x))

    def forward(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        n = batch["x"].shape[0]
        images, teacher = batch["x"], batch["teacher"]
        if "u_x" in batch:
            # One encoder pass over both streams (BatchNorm sees them together).
            images, teacher = torch.cat([images, batch["u_x"]]), torch.cat([teacher, batch["u_teacher"]])
        student = self.embed(images)
        cos = F.cosine_similarity(student, teacher.detach().to(student.dtype), dim=1)
        loss_cos = (1.0 - cos).mean()
        logits = self.classifier(student[:n])
        loss_ce = F.cross_entropy(logits, batch["y"])
        loss = self.w_cos * loss_cos + self.w_ce * loss_ce
        return {"loss": loss, "loss_cos": loss_cos.detach(), "loss_ce": loss_ce.detach(),
                "cos": cos.mean().detach(), "acc": (logits.argmax(1) == batch["y"]).float().mean().detach()}
