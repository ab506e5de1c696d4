"""Training on a teacher's pseudo-labels, and the bookkeeping shared with FixMatch.

A teacher (see :mod:`polyclip.methods.teacher`) labels the unlabeled pool once, on the
driver; each unlabeled image then carries ``teacher_y`` (its label) and ``teacher_conf``
(the teacher's max probability). :class:`PseudoLabelTask` trains a student on the labeled
images plus the pool images whose teacher confidence passes a (scheduled) threshold.
:class:`polyclip.methods.fixmatch.FixMatchTask` takes the same teacher arrays to combine
both (teacher labels as extra labeled data, or as the target where the student is unsure).

:func:`pseudo_label_report` measures, where the pool's true labels are known, the
precision of the accepted pseudo-labels per class and the classes that never pass the
threshold (the failure described for CLIP pseudo-labels with few labels: a confident
teacher covers only the classes it already knows).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from polyclip.backbones.base import Backbone
from polyclip.distributed import all_reduce, training_device
from polyclip.methods.ema import ModelEma
from polyclip.methods.image_classifier import ImageClassifier


class ThresholdSchedule:
    """A confidence threshold per epoch: constant, or linear from ``start`` to ``end``.

    ``linear``: ``start + (end - start) * min(epoch / (epochs - 1), 1)``, so epoch 0 uses
    ``start`` and the last epoch ``end``.

    Args:
        start: Threshold at epoch 0 (and always, when constant).
        end: Threshold at the last epoch (``linear`` only).
        epochs: Number of training epochs (``linear`` only).
        kind: ``"constant"`` or ``"linear"``.

    Example:
        >>> ThresholdSchedule(0.98, 0.9, epochs=5, kind="linear")(2)
        0.94
    """

    def __init__(self, start: float, end: float | None = None, epochs: int = 1,
                 kind: Literal["constant", "linear"] = "constant") -> None:
        if kind not in ("constant", "linear"):
            raise ValueError(f"unknown threshold schedule {kind!r}; valid: constant, linear")
        if kind == "linear" and end is None:
            raise ValueError("a linear threshold schedule needs an end threshold")
        for value in (start, end):
            if value is not None and not 0.0 <= value <= 1.0:
                raise ValueError(f"thresholds must be in [0, 1], got {value}")
        if epochs < 1:
            raise ValueError(f"epochs must be >= 1, got {epochs}")
        self.start, self.end, self.epochs, self.kind = start, end, epochs, kind

    def __call__(self, epoch: int) -> float:
        if self.kind == "constant" or self.end is None:
            return self.start
        fraction = min(max(epoch, 0) / max(self.epochs - 1, 1), 1.0)
        return round(self.start + (self.end - self.start) * fraction, 12)

    def values(self) -> list[float]:
        """The distinct thresholds the schedule visits, in order (for reports)."""
        seen: list[float] = []
        for epoch in range(self.epochs if self.kind == "linear" else 1):
            value = self(epoch)
            if value not in seen:
                seen.append(value)
        return seen


class AcceptanceMeter:
    """Per-epoch counts of accepted pseudo-labels, per class, and their accuracy.

    True labels of the unlabeled pool only enter here (for logging), never a loss. The
    counters live on the device of the batches they count (moved there on the first
    update) and are updated there without a host sync; :meth:`summary` sums them over DDP
    workers on that device (NCCL has no CPU backend), so every rank reports the global
    figures, and resets them.

    Args:
        class_names: Names used in the logged keys (``accepted/<name>``).
        prefix: Prepended to every key (``"teacher_"``...).

    Example:
        >>> meter = AcceptanceMeter(["a", "b"])
        >>> meter.update(torch.tensor([0, 1]), torch.tensor([True, False]), torch.tensor([0, 0]))
        >>> meter.summary()
        {'mask_rate': 0.5, 'pseudo_acc': 1.0, 'accepted/a': 1.0, 'accepted/b': 0.0}
    """

    seen: torch.Tensor
    accepted: torch.Tensor
    correct: torch.Tensor

    def __init__(self, class_names: Sequence[str], prefix: str = "") -> None:
        self.class_names, self.prefix = list(class_names), prefix
        # Before the first batch: the declared training device, so that a rank that saw no
        # batch still reduces on the device its backend accepts.
        self.device = training_device() or torch.device("cpu")
        self.reset()

    def reset(self) -> None:
        """Zero the counters (on the device of the last batch)."""
        c = len(self.class_names)
        self.seen = torch.zeros(1, dtype=torch.long, device=self.device)
        self.accepted = torch.zeros(c, dtype=torch.long, device=self.device)
        self.correct = torch.zeros(c, dtype=torch.long, device=self.device)

    @torch.no_grad()
    def update(self, labels: torch.Tensor, mask: torch.Tensor, true_labels: torch.Tensor | None) -> None:
        """Add a batch: pseudo-labels ``(B,)``, acceptance mask ``(B,)``, true labels ``(B,)`` if known."""
        if labels.device != self.device:
            self.device = labels.device
            self.seen, self.accepted, self.correct = (t.to(self.device) for t in (self.seen, self.accepted,
                                                                                   self.correct))
        labels, mask = labels.detach().long(), mask.detach().bool()
        self.seen += mask.numel()
        # index_add_ rather than bincount, whose data-dependent output size syncs on CUDA.
        self.accepted.index_add_(0, labels, mask.long())
        if true_labels is not None:
            hit = mask & (labels == true_labels.detach().to(self.device).long())
            self.correct.index_add_(0, labels, hit.long())

    def reduced_counts(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(seen (1,), accepted (C,), correct (C,))`` summed over all workers, on the batches' device.

        Every DDP worker must call this (or :meth:`summary`) at the same point.
        """
        c = len(self.class_names)
        counts = all_reduce(torch.cat([self.seen, self.accepted, self.correct]), expected=self.device)
        return counts[:1], counts[1:1 + c], counts[1 + c:]

    def summary(self, with_accuracy: bool = True) -> dict[str, float]:
        """``mask_rate``, ``pseudo_acc`` (if any was accepted) and ``accepted/<class>``; resets."""
        seen_t, accepted_t, correct_t = self.reduced_counts()
        seen, accepted, correct = seen_t.item(), accepted_t.tolist(), correct_t.tolist()  # one read per epoch
        p = self.prefix
        total = sum(accepted)
        out = {f"{p}mask_rate": total / max(seen, 1)}
        if with_accuracy and total > 0:
            out[f"{p}pseudo_acc"] = sum(correct) / total
        out.update({f"{p}accepted/{name}": float(n) for name, n in zip(self.class_names, accepted)})
        self.reset()
        return out


def teacher_mask(confidence: torch.Tensor, threshold: float) -> torch.Tensor:
    """Which teacher labels are kept: ``confidence >= threshold``, ``(B,)`` bool."""
    return confidence >= threshold


class PseudoLabelTask(nn.Module):
    """Train a classifier on labeled images plus confident teacher pseudo-labels.

    ``loss = CE(f(A(x)), y) + weight * sum_b m_b CE(f(A(u_b)), t_b) / max(sum_b m_b, 1)``

    with ``A`` the (weak) training augmentation, ``t_b`` the teacher's label, and
    ``m_b = 1[conf_b >= threshold(epoch)]``: accepted pseudo-labels act as extra labeled
    data. The labeled-to-pseudo batch ratio is set by the job's streams.

    Args:
        backbone: The student's encoder.
        num_classes: ``C``.
        schedule: Teacher threshold per epoch (constant 0.98 by default).
        weight: Weight of the pseudo-label loss.
        augment: Augmentation of [0, 1] images in training (e.g. ``fixmatch_weak()``).
        ema_decay: Evaluate an EMA of the weights (None: the weights themselves).
        class_names: For the logged keys.
        head_hidden: Hidden width of an MLP head.
        head_depth: Linear layers in the head.
        pseudo_labels: ``False``: train on the labeled images alone, the supervised
            baseline with the same augmentation and EMA (no pool in the batch).

    Batch: ``x``, ``y``; with ``pseudo_labels``, also ``u_x``, ``u_teacher_y``,
    ``u_teacher_conf``; ``u_y`` (true labels, optional) is only counted for the logged
    pseudo-label accuracy.
    """

    epoch: torch.Tensor

    def __init__(self, backbone: Backbone, num_classes: int, *, schedule: ThresholdSchedule | None = None,
                 weight: float = 1.0, augment: nn.Module | None = None, ema_decay: float | None = 0.999,
                 class_names: Sequence[str] | None = None, head_hidden: int = 0, head_depth: int = 1,
                 pseudo_labels: bool = True) -> None:
        super().__init__()
        self.pseudo_labels = pseudo_labels
        self.model = ImageClassifier(backbone, num_classes, head_hidden=head_hidden, head_depth=head_depth)
        self.ema = ModelEma(self.model, ema_decay, warmup=True) if ema_decay is not None else None
        self.schedule = schedule or ThresholdSchedule(0.98)
        self.weight = weight
        self.augment = augment
        if isinstance(augment, nn.Module):  # sampled, never trained (DDP waits for trainable parameters)
            augment.requires_grad_(False)
        names = list(class_names) if class_names is not None else [str(i) for i in range(num_classes)]
        self.meter = AcceptanceMeter(names, prefix="teacher_")
        self.register_buffer("epoch", torch.zeros((), dtype=torch.long))

    @property
    def backbone(self) -> Backbone:
        """The encoder that is evaluated (the EMA copy's when there is one); jobs export it."""
        model = self.ema.module if self.ema is not None else self.model
        return model.backbone  # type: ignore[return-value,union-attr]

    def threshold(self) -> float:
        """The teacher threshold of the current epoch."""
        return self.schedule(int(self.epoch))

    def _unit(self, images: torch.Tensor) -> torch.Tensor:
        x = self.model.backbone.to_unit(images)
        return self.augment(x) if self.training and self.augment is not None else x

    def predict(self, x: torch.Tensor) -> torch.Tensor:
        model = self.ema if self.ema is not None else self.model
        return model(self.model.backbone.to_unit(x))  # type: ignore[no-any-return]

    def forward(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        if not self.pseudo_labels:  # the supervised baseline (same augmentation and EMA)
            logits_x = self.model(self._unit(batch["x"]))
            loss_x = F.cross_entropy(logits_x, batch["y"])
            return {"loss": loss_x, "acc": (logits_x.argmax(1) == batch["y"]).float().mean().detach()}
        if "u_x" not in batch:
            raise KeyError("PseudoLabelTask(pseudo_labels=True) needs the pool stream (u_x, u_teacher_y, "
                           "u_teacher_conf) in every batch")
        n = batch["x"].shape[0]
        logits = self.model(self._unit(torch.cat([batch["x"], batch["u_x"]])))
        logits_x, logits_u = logits[:n], logits[n:]
        loss_x = F.cross_entropy(logits_x, batch["y"])
        mask = teacher_mask(batch["u_teacher_conf"], self.threshold())
        per_image = F.cross_entropy(logits_u, batch["u_teacher_y"].long(), reduction="none")
        loss_p = (per_image * mask).sum() / mask.sum().clamp(min=1)
        if self.training:
            self.meter.update(batch["u_teacher_y"], mask, batch.get("u_y"))
        return {"loss": loss_x + self.weight * loss_p, "loss_x": loss_x.detach(), "loss_p": loss_p.detach(),
                "acc": (logits_x.argmax(1) == batch["y"]).float().mean().detach()}

    def after_optimizer_step(self) -> None:
        if self.ema is not None:
            self.ema.update(self.model)

    def epoch_summary(self) -> dict[str, float]:
        out: dict[str, float] = {}
        if float(self.meter.seen) > 0:  # every DDP rank streams the same splits, so all agree here
            out = {"teacher_threshold": self.threshold(), **self.meter.summary()}
        self.epoch += 1
        return out


def pseudo_label_report(teacher_probs: np.ndarray, true_labels: np.ndarray, class_names: Sequence[str],
                        thresholds: Sequence[float]) -> dict[str, Any]:
    """Quality of a teacher's accepted pseudo-labels, per class, at each threshold.

    Args:
        teacher_probs: ``(N, C)`` teacher probabilities over the unlabeled pool.
        true_labels: ``(N,)`` the pool's true labels (held back from training).
        class_names: ``C`` names.
        thresholds: Confidence thresholds to evaluate (e.g. a schedule's values).

    Returns:
        ``{"pool_size", "teacher_accuracy", "thresholds": [{"threshold", "accepted",
        "accepted_rate", "precision", "per_class": {name: {"accepted", "precision",
        "recall"}}, "never_passing": [names]}, ...]}``. A class *never passes* when no
        image is accepted with that label; its precision is None.
    """
    probs = np.asarray(teacher_probs, dtype=np.float64)
    labels = np.asarray(true_labels).astype(np.int64)
    if probs.ndim != 2 or probs.shape[0] != labels.shape[0] or probs.shape[1] != len(class_names):
        raise ValueError(f"teacher_probs {probs.shape} must be (N, {len(class_names)}) with N = {labels.shape[0]} "
                         "true labels")
    pred, conf = probs.argmax(1), probs.max(1)
    report: dict[str, Any] = {"pool_size": len(labels),
                              "teacher_accuracy": float((pred == labels).mean()) if len(labels) else 0.0,
                              "thresholds": []}
    for tau in thresholds:
        keep = conf >= tau
        per_class: dict[str, dict[str, float | int | None]] = {}
        for c, name in enumerate(class_names):
            accepted = keep & (pred == c)
            n = int(accepted.sum())
            in_class = int((labels == c).sum())
            correct = int((accepted & (labels == c)).sum())
            per_class[name] = {"accepted": n, "precision": correct / n if n else None,
                               "recall": correct / in_class if in_class else None}
        n_keep = int(keep.sum())
        report["thresholds"].append({
            "threshold": float(tau), "accepted": n_keep, "accepted_rate": n_keep / max(len(labels), 1),
            "precision": float((pred[keep] == labels[keep]).mean()) if n_keep else None,
            "per_class": per_class,
            "never_passing": [name for name, row in per_class.items() if row["accepted"] == 0],
        })
    return report


__all__ = ["AcceptanceMeter", "PseudoLabelTask", "ThresholdSchedule", "pseudo_label_report", "teacher_mask"]
