"""FixMatch (Sohn et al., 2020): consistency between weak and strong views, with confident labels.

Each step sees ``B`` labeled and ``mu * B`` unlabeled images. The model labels a weak view
(flip + translation) of every unlabeled image; where its confidence reaches the threshold,
a strong view (RandAugment + Cutout) is trained to predict that hard label:

    loss = CE(f(weak(x)), y) + lambda_u * FixMatchLoss(f(weak(u)), f(strong(u)), tau)

All three views go through the model in one forward pass (one set of BatchNorm
statistics, and one DDP forward). Options:

* ``thresholds``: a :class:`~polyclip.methods.class_aware_threshold.ClassAwareThreshold`
  replaces the fixed ``tau`` by per-class thresholds updated every step.
* ``teacher_mode``: unlabeled images may carry a teacher's label (``u_teacher_y``,
  ``u_teacher_conf``, see :mod:`polyclip.methods.pseudo_label`). ``"extra_labeled"`` adds
  ``teacher_weight * CE(f(weak(u)), t)`` over the images whose teacher confidence passes
  the teacher threshold; ``"fallback"`` uses the teacher label as the strong view's target
  where the student is below its threshold and the teacher is above its own.
* ``ema_decay``: evaluation (``predict``) uses an EMA of the weights, checkpointed with the task.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from polyclip.augment.fixmatch import fixmatch_strong, fixmatch_weak
from polyclip.backbones.base import Backbone
from polyclip.losses.fixmatch import FixMatchLoss
from polyclip.methods.class_aware_threshold import ClassAwareThreshold
from polyclip.methods.ema import ModelEma
from polyclip.methods.image_classifier import ImageClassifier
from polyclip.methods.pseudo_label import AcceptanceMeter, ThresholdSchedule, teacher_mask

TeacherMode = Literal["extra_labeled", "fallback"]


class FixMatchTask(nn.Module):
    """FixMatch on images, optionally with class-aware thresholds and teacher labels.

    Args:
        backbone: The encoder (trained).
        num_classes: ``C``.
        threshold: Fixed confidence threshold (paper: 0.95); the initial one with ``thresholds``.
        lambda_u: Weight of the unlabeled loss (paper: 1).
        weak: Weak augmentation on [0, 1] images; ``fixmatch_weak()`` if None.
        strong: Strong augmentation; ``fixmatch_strong()`` if None.
        ema_decay: Evaluate an EMA of the weights with this decay (paper: 0.999); None for none.
        thresholds: Class-aware adaptive thresholds (replace ``threshold``).
        teacher_mode: How teacher labels in the batch are used (None: ignored).
        teacher_schedule: Teacher confidence threshold per epoch.
        teacher_weight: Weight of the teacher loss in ``"extra_labeled"`` mode.
        class_names: For the logged keys (``accepted/<name>``, ``threshold/<name>``).
        head_hidden: Hidden width of an MLP head.
        head_depth: Linear layers in the head.

    Batch: ``x`` uint8 ``(B, C, H, W)``, ``y``; ``u_x`` uint8 ``(mu B, C, H, W)``; optional
    ``u_teacher_y``, ``u_teacher_conf``. ``u_y`` (true labels of the pool), when present, is
    only counted for the logged pseudo-label accuracy and never reaches a loss.
    """

    epoch: torch.Tensor

    def __init__(self, backbone: Backbone, num_classes: int, *, threshold: float = 0.95, lambda_u: float = 1.0,
                 weak: nn.Module | None = None, strong: nn.Module | None = None, ema_decay: float | None = 0.999,
                 thresholds: ClassAwareThreshold | None = None, teacher_mode: TeacherMode | None = None,
                 teacher_schedule: ThresholdSchedule | None = None, teacher_weight: float = 1.0,
                 class_names: Sequence[str] | None = None, head_hidden: int = 0, head_depth: int = 1) -> None:
        super().__init__()
        if not 0.0 <= threshold <= 1.0:
            raise ValueError(f"threshold must be in [0, 1], got {threshold}")
        if teacher_mode not in (None, "extra_labeled", "fallback"):
            raise ValueError(f"unknown teacher_mode {teacher_mode!r}; valid: extra_labeled, fallback, or None")
        if thresholds is not None and thresholds.num_classes != num_classes:
            raise ValueError(f"thresholds cover {thresholds.num_classes} classes, the task has {num_classes}")
        self.model = ImageClassifier(backbone, num_classes, head_hidden=head_hidden, head_depth=head_depth)
        self.ema = ModelEma(self.model, ema_decay, warmup=True) if ema_decay is not None else None
        self.weak = weak if weak is not None else fixmatch_weak()
        self.strong = strong if strong is not None else fixmatch_strong()
        # Augmentations are sampled, never trained: DDP must not wait for gradients of their parameters.
        self.weak.requires_grad_(False)
        self.strong.requires_grad_(False)
        self.threshold, self.lambda_u = threshold, lambda_u
        self.thresholds = thresholds
        self.teacher_mode = teacher_mode
        self.teacher_schedule = teacher_schedule or ThresholdSchedule(0.98)
        self.teacher_weight = teacher_weight
        self.unlabeled_loss = FixMatchLoss()
        self.class_names = list(class_names) if class_names is not None else [str(i) for i in range(num_classes)]
        if len(self.class_names) != num_classes:
            raise ValueError(f"{len(self.class_names)} class names for {num_classes} classes")
        self.meter = AcceptanceMeter(self.class_names)
        self.teacher_meter = AcceptanceMeter(self.class_names, prefix="teacher_")
        self.register_buffer("epoch", torch.zeros((), dtype=torch.long))

    @property
    def backbone(self) -> Backbone:
        """The encoder that is evaluated (the EMA copy's when there is one); jobs export it."""
        model = self.ema.module if self.ema is not None else self.model
        return model.backbone  # type: ignore[return-value,union-attr]

    def predict(self, x: torch.Tensor) -> torch.Tensor:
        model = self.ema if self.ema is not None else self.model
        return model(self.model.backbone.to_unit(x))  # type: ignore[no-any-return]

    def forward(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        to_unit = self.model.backbone.to_unit
        x, u = to_unit(batch["x"]), to_unit(batch["u_x"])
        n, m = x.shape[0], u.shape[0]
        logits = self.model(torch.cat([self.weak(x), self.weak(u), self.strong(u)]))
        logits_x, logits_weak, logits_strong = logits[:n], logits[n:n + m], logits[n + m:]
        loss_x = F.cross_entropy(logits_x, batch["y"])
        tau = self.thresholds.tau if self.thresholds is not None else self.threshold
        loss_u, mask, pseudo = self.unlabeled_loss(logits_weak, logits_strong, tau)
        out = {"loss_x": loss_x.detach(), "acc": (logits_x.argmax(1) == batch["y"]).float().mean().detach()}
        loss = loss_x + self.lambda_u * loss_u
        if self.teacher_mode is not None:
            t_label = batch["u_teacher_y"].long()
            t_mask = teacher_mask(batch["u_teacher_conf"], self.teacher_schedule(int(self.epoch)))
            if self.teacher_mode == "fallback":
                # The strong view learns the teacher's label where only the teacher is confident.
                use = t_mask & ~mask
                extra = (F.cross_entropy(logits_strong, t_label, reduction="none") * use).mean()
                loss_u = loss_u + extra
                loss = loss + self.lambda_u * extra
            else:
                use = t_mask
                extra = (F.cross_entropy(logits_weak, t_label, reduction="none") * use).sum() / use.sum().clamp(min=1)
                loss = loss + self.teacher_weight * extra
            out["loss_teacher"] = extra.detach()
            if self.training:
                self.teacher_meter.update(t_label, use, batch.get("u_y"))
        if self.training:
            self.meter.update(pseudo, mask, batch.get("u_y"))
            if self.thresholds is not None:
                self.thresholds.update(pseudo, mask)
        out.update({"loss": loss, "loss_u": loss_u.detach()})
        return out

    def after_optimizer_step(self) -> None:
        if self.ema is not None:
            self.ema.update(self.model)

    def epoch_summary(self) -> dict[str, float]:
        """Mask rate, pseudo-label accuracy, accepted counts and thresholds per class (all workers)."""
        out = self.meter.summary()
        if self.teacher_mode is not None:
            out["teacher_threshold"] = self.teacher_schedule(int(self.epoch))
            out.update(self.teacher_meter.summary())
        if self.thresholds is not None:
            out.update({f"threshold/{name}": float(t) for name, t in zip(self.class_names, self.thresholds.tau)})
        self.epoch += 1
        return out


__all__ = ["FixMatchTask", "TeacherMode"]
