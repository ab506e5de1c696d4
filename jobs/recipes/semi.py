"""``method.name: semi``: FixMatch, teacher pseudo-labels, both, or the supervised baseline.

One recipe, three switches:

* ``unlabeled_loss: fixmatch`` trains FixMatch on the unlabeled pool (``mu`` unlabeled
  images per labeled one); ``none`` trains on labeled images (and teacher labels) only.
* ``adaptive_threshold`` (FixMatch only): class-aware thresholds (Lucas et al., 2021).
* ``teacher``: a teacher labels the pool on the driver (a probe on cached features of any
  backbone spec, ``checkpoint:<run dir>`` included; CLIP zero-shot; a fitted ensemble).
  Without FixMatch, the confident teacher labels are extra labeled data; with FixMatch,
  ``teacher.mode`` says how they combine.

Without FixMatch and without a teacher it is the supervised baseline on the same labels,
with the same weak augmentation, EMA and budget. The per-class precision of the accepted
teacher labels and the classes that never pass go to ``payload["info"]["report"]``.
"""

from __future__ import annotations

import logging
from typing import Any, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, model_validator
from torch import nn

from jobs.recipes.base import MethodParams, PrepareContext, Recipe, split_arrays
from jobs.streaming import filter_min
from polyclip.augment.fixmatch import fixmatch_strong, fixmatch_weak
from polyclip.backbones import create_backbone
from polyclip.methods.class_aware_threshold import ClassAwareThreshold
from polyclip.methods.fixmatch import FixMatchTask
from polyclip.methods.pseudo_label import PseudoLabelTask, ThresholdSchedule, pseudo_label_report
from polyclip.methods.teacher import ensemble_teacher, fit_probe_teacher, zero_shot_teacher

logger = logging.getLogger("polyclip")


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class AdaptiveThresholdParams(_Section):
    """Class-aware thresholds: ``tau_c += eps * sign(p_c - r_c)`` every step."""

    alpha: float = Field(0.9, ge=0, lt=1)
    eps: float = Field(0.001, ge=0)
    prior: list[float] | None = Field(None, description="class prior r; uniform when null")
    tau_min: float = Field(0.5, ge=0, le=1)
    tau_max: float = Field(0.999, ge=0, le=1)


class TeacherParams(_Section):
    """Who labels the unlabeled pool, and which labels are kept."""

    kind: Literal["probe", "zero_shot", "ensemble"] = "probe"
    spec: str = Field("efficientnet_lite:0", description="probe / zero_shot: create_backbone spec "
                      "(checkpoint:<run dir> for a trained polyclip model)")
    image_size: int | None = Field(112, gt=0)
    path: str | None = Field(None, description="ensemble: folder of a saved ensemble (polyclip.ensemble)")
    l2_reg: float = Field(1e-3, ge=0, description="probe: L2 penalty (sets how confident the teacher is)")
    threshold: float = Field(0.98, ge=0, le=1)
    threshold_end: float | None = Field(None, ge=0, le=1, description="linear schedule: threshold at the last epoch")
    schedule: Literal["constant", "linear"] = "constant"
    weight: float = Field(1.0, ge=0, description="weight of the teacher-label loss")
    mode: Literal["extra_labeled", "fallback"] = Field(
        "extra_labeled", description="with FixMatch: extra labeled data, or the target where the student is unsure")

    @model_validator(mode="after")
    def _consistent(self) -> TeacherParams:
        if self.schedule == "linear" and self.threshold_end is None:
            raise ValueError("teacher.schedule=linear needs teacher.threshold_end")
        if self.kind == "ensemble" and not self.path:
            raise ValueError("teacher.kind=ensemble needs teacher.path (a saved ensemble folder)")
        return self


class SemiParams(MethodParams):
    name: Literal["semi"] = "semi"
    unlabeled_loss: Literal["fixmatch", "none"] = "fixmatch"
    mu: int = Field(7, ge=1, description="unlabeled (or pseudo-labeled) images per labeled image in a batch")
    threshold: float = Field(0.95, ge=0, le=1, description="FixMatch confidence threshold")
    lambda_u: float = Field(1.0, ge=0)
    ema_decay: float | None = Field(0.999, ge=0, lt=1, description="null: evaluate the raw weights")
    flip_p: float = Field(0.5, ge=0, le=1)
    max_shift: float = Field(0.125, ge=0, lt=1)
    randaugment_n: int = Field(2, ge=1)
    randaugment_m: int = Field(10, gt=0, lt=30)
    cutout: float = Field(0.5, ge=0, le=1)
    adaptive_threshold: AdaptiveThresholdParams | None = None
    teacher: TeacherParams | None = None
    head_hidden: int = Field(0, ge=0)
    head_depth: int = Field(1, ge=1)

    @model_validator(mode="after")
    def _consistent(self) -> SemiParams:
        if self.adaptive_threshold is not None and self.unlabeled_loss != "fixmatch":
            raise ValueError("adaptive_threshold needs unlabeled_loss=fixmatch")
        return self


def schedule_of(teacher: TeacherParams, epochs: int) -> ThresholdSchedule:
    """The teacher's threshold schedule over a job's epochs."""
    return ThresholdSchedule(teacher.threshold, teacher.threshold_end, epochs=epochs, kind=teacher.schedule)


def teacher_probabilities(ctx: PrepareContext, teacher: TeacherParams) -> np.ndarray:
    """The teacher's class probabilities over the unlabeled pool ``(N_u, C)`` (driver side)."""
    num_classes = len(ctx.dataset.class_names)
    if teacher.kind == "probe":
        labeled = ctx.features(teacher.spec, teacher.image_size, "labeled")
        pool = ctx.features(teacher.spec, teacher.image_size, "unlabeled")
        return fit_probe_teacher(labeled, ctx.labels("labeled"), pool, num_classes, l2_reg=teacher.l2_reg)
    if teacher.kind == "zero_shot":
        backbone = create_backbone(teacher.spec, image_size=teacher.image_size)
        pool = ctx.features(teacher.spec, teacher.image_size, "unlabeled")
        return zero_shot_teacher(backbone, ctx.dataset.class_names, pool)
    from polyclip.ensemble import load_ensemble

    ensemble = load_ensemble(str(teacher.path))
    if list(ensemble.class_names) != list(ctx.dataset.class_names):
        raise ValueError(f"ensemble {teacher.path} predicts {ensemble.class_names}, the dataset has "
                         f"{ctx.dataset.class_names}")
    features = [ctx.features(b.spec, b.image_size, "unlabeled") for b in ensemble.backbones]
    return ensemble_teacher(ensemble, features)


def prepare(ctx: PrepareContext, params: SemiParams) -> dict[str, Any]:
    payload: dict[str, Any] = split_arrays(ctx, ctx.images)
    payload["info"] = {}
    if params.unlabeled_loss == "none" and params.teacher is None:
        return payload
    if params.teacher is None:
        payload["unlabeled"] = ctx.unlabeled()  # streamed to the workers; y is held back, logged only
        return payload
    probs = teacher_probabilities(ctx, params.teacher)
    schedule = schedule_of(params.teacher, ctx.cfg.train.epochs)
    held_back = ctx.labels("unlabeled")
    if len(held_back) == len(probs):  # a pool from an unlabeled source has no labels to check the teacher against
        report = pseudo_label_report(probs, held_back, ctx.dataset.class_names, schedule.values())
        report.update(kind=params.teacher.kind, spec=params.teacher.spec, schedule=params.teacher.schedule)
        payload["info"]["report"] = {"teacher": report}
        first = report["thresholds"][0]
        logger.info("teacher %s: pool accuracy %.3f; at threshold %.3f accepts %d (precision %s); never passing: %s",
                    params.teacher.kind, report["teacher_accuracy"], first["threshold"], first["accepted"],
                    first["precision"], first["never_passing"] or "none")
    teacher = {"teacher_y": probs.argmax(1).astype(np.int64), "teacher_conf": probs.max(1).astype(np.float32)}
    pool = ctx.unlabeled(teacher)
    if params.unlabeled_loss == "none":
        # Only images that pass the most lenient threshold of the schedule can ever be used.
        keep = teacher["teacher_conf"] >= min(schedule.values())
        if not keep.any():
            raise ValueError(f"no pool image reaches teacher threshold {min(schedule.values())} "
                             f"(max confidence {float(teacher['teacher_conf'].max()):.3f}); lower teacher.threshold "
                             "or teacher.l2_reg")
        if isinstance(pool, dict):
            pool = {k: v[keep] for k, v in pool.items()}
        else:
            pool = filter_min(pool, "teacher_conf", min(schedule.values()), int(keep.sum()))
    payload["unlabeled"] = pool
    return payload


def build_task(cfg: Any, params: SemiParams, payload: dict[str, Any]) -> nn.Module:
    in_chans = int(payload["train"]["x"].shape[1])
    spec = cfg.backbone.spec
    backbone = create_backbone(spec, image_size=cfg.backbone.image_size,
                               in_chans=in_chans if spec.startswith(("random:", "pixels")) else None)
    class_names = list(payload["class_names"])
    num_classes = len(class_names)
    weak = fixmatch_weak(flip_p=params.flip_p, max_shift=params.max_shift)
    schedule = schedule_of(params.teacher, cfg.train.epochs) if params.teacher is not None else None
    common = dict(ema_decay=params.ema_decay, class_names=class_names, head_hidden=params.head_hidden,
                  head_depth=params.head_depth)
    if params.unlabeled_loss == "none":
        return PseudoLabelTask(backbone, num_classes, schedule=schedule, augment=weak,
                               weight=params.teacher.weight if params.teacher else 1.0, **common)  # type: ignore[arg-type]
    strong = fixmatch_strong(n=params.randaugment_n, m=params.randaugment_m, cutout_size=params.cutout,
                             flip_p=params.flip_p, max_shift=params.max_shift)
    adaptive = None
    if params.adaptive_threshold is not None:
        a = params.adaptive_threshold
        adaptive = ClassAwareThreshold(num_classes, init=params.threshold, alpha=a.alpha, eps=a.eps, prior=a.prior,
                                       tau_min=min(a.tau_min, params.threshold),
                                       tau_max=max(a.tau_max, params.threshold))
    return FixMatchTask(backbone, num_classes, threshold=params.threshold, lambda_u=params.lambda_u, weak=weak,
                        strong=strong, thresholds=adaptive,
                        teacher_mode=params.teacher.mode if params.teacher else None, teacher_schedule=schedule,
                        teacher_weight=params.teacher.weight if params.teacher else 1.0, **common)  # type: ignore[arg-type]


def streams(params: SemiParams) -> dict[str, tuple[str, int]]:
    """The labeled stream, plus the pool (``mu`` times the batch) unless supervised only."""
    if params.unlabeled_loss == "none" and params.teacher is None:
        return {"": ("train", 1)}
    return {"": ("train", 1), "u_": ("unlabeled", params.mu)}


def report(cfg: Any, params: SemiParams, payload: dict[str, Any], arrays: dict[str, np.ndarray]) -> dict[str, Any]:
    """``metrics["teacher_report"]``: per-class precision of accepted teacher labels, never-passing classes."""
    teacher = payload["info"].get("report", {}).get("teacher")
    return {"teacher_report": teacher} if teacher is not None else {}


RECIPE = Recipe(params=SemiParams, prepare=prepare, build_task=build_task, streams=streams, report=report)
