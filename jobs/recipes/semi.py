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
teacher labels and the classes that never pass go to the payload's driver-side facts
(``Payload.report["teacher"]``), and from there to ``metrics["teacher_report"]``.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
from pydantic import Field, model_validator
from torch import nn

from jobs.config_base import StrictModel
from jobs.recipes.base import MethodParams, Payload, PrepareContext, Recipe, split_arrays
from jobs.streaming import filter_min
from polyclip.augment.fixmatch import fixmatch_strong, fixmatch_weak
from polyclip.backbones import create_backbone
from polyclip.methods.class_aware_threshold import ClassAwareThreshold
from polyclip.methods.fixmatch import FixMatchTask
from polyclip.methods.label_propagation import label_propagation_teacher, propagate_with_validation
from polyclip.methods.pseudo_label import PseudoLabelTask, ThresholdSchedule, pseudo_label_report
from polyclip.methods.teacher import (
    choose_confidence_threshold,
    ensemble_teacher,
    fit_probe_teacher,
    select_probe_teacher,
    zero_shot_teacher,
)

logger = logging.getLogger("polyclip")


class _Section(StrictModel):
    """A nested section of ``method:`` (unknown keys are errors, like every config section)."""


class AdaptiveThresholdParams(_Section):
    """Class-aware thresholds: ``tau_c += eps * sign(p_c - r_c)`` every step."""

    alpha: float = Field(0.9, ge=0, lt=1)
    eps: float = Field(0.001, ge=0)
    prior: list[float] | None = Field(None, description="class prior r; uniform when null")
    tau_min: float = Field(0.5, ge=0, le=1)
    tau_max: float = Field(0.999, ge=0, le=1)


class TeacherParams(_Section):
    """Who labels the unlabeled pool, and which labels are kept."""

    kind: Literal["probe", "zero_shot", "ensemble", "propagation"] = "probe"
    spec: str = Field("efficientnet_lite:0", description="probe / zero_shot: create_backbone spec "
                      "(checkpoint:<run dir> for a trained polyclip model)")
    image_size: int | None = Field(112, gt=0)
    path: str | None = Field(None, description="ensemble: folder of a saved ensemble (polyclip.ensemble)")
    l2_reg: float | None = Field(None, ge=0, description="probe: L2 penalty (sets how confident the teacher is); "
                                 "null: chosen by held-out NLL on the validation split (or folds of the labeled set)")
    threshold: float | None = Field(None, ge=0, le=1, description="acceptance threshold; null: the lowest whose "
                                    "held-out precision reaches target_precision (never read from the pool's labels)")
    target_precision: float = Field(0.9, gt=0, le=1, description="threshold: null: held-out precision to reach")
    extra_specs: list[str] = Field(default_factory=list, description="propagation: more backbones whose "
                                   "L2-normalised features are concatenated with spec's")
    k: int = Field(20, ge=1, description="propagation: neighbours in the kNN graph")
    alpha: float = Field(0.99, gt=0, lt=1, description="propagation: Zhou et al.'s alpha")
    balance: Literal["sinkhorn", "distribution_alignment", "none"] = Field(
        "sinkhorn", description="propagation: class balancing of the propagated labels")
    threshold_end: float | None = Field(None, ge=0, le=1, description="linear schedule: threshold at the last epoch")
    schedule: Literal["constant", "linear"] = "constant"
    weight: float = Field(1.0, ge=0, description="weight of the teacher-label loss")
    mode: Literal["extra_labeled", "fallback"] = Field(
        "extra_labeled", description="with FixMatch: extra labeled data, or the target where the student is unsure")

    @model_validator(mode="after")
    def _consistent(self) -> TeacherParams:
        if self.schedule == "linear" and (self.threshold_end is None or self.threshold is None):
            raise ValueError("teacher.schedule=linear needs teacher.threshold and teacher.threshold_end")
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
    """The teacher's threshold schedule over a job's epochs (its threshold must be set or resolved)."""
    if teacher.threshold is None:
        raise ValueError("teacher.threshold is unresolved: resolve_teacher() chooses it on validation data")
    return ThresholdSchedule(teacher.threshold, teacher.threshold_end, epochs=epochs, kind=teacher.schedule)


def resolve_teacher(ctx: PrepareContext, teacher: TeacherParams) -> tuple[np.ndarray, TeacherParams, dict[str, Any]]:
    """The teacher's pool probabilities, with every unset choice (L2, threshold) made on held-out labeled data.

    Selection reads the validation split (or folds of the labeled set), never the held-back
    labels of the pool: those only measure the result in the report.

    Returns:
        ``(probabilities (N_u, C), the teacher's params with threshold and l2_reg filled in,
        what was selected and on what)``.
    """
    num_classes = len(ctx.dataset.class_names)
    has_val = len(ctx.indices("val")) > 0
    selection: dict[str, Any] = {}
    resolved = teacher.model_copy()
    if teacher.kind == "probe":
        labeled = ctx.features(teacher.spec, teacher.image_size, "labeled")
        val = ctx.features(teacher.spec, teacher.image_size, "val") if has_val else None
        if teacher.l2_reg is None or teacher.threshold is None:
            chosen = select_probe_teacher(labeled, ctx.labels("labeled"), num_classes, val_features=val,
                                          val_labels=ctx.labels("val") if has_val else None,
                                          target_precision=teacher.target_precision, seed=ctx.cfg.seed)
            selection = chosen.to_dict()
            resolved.l2_reg = teacher.l2_reg if teacher.l2_reg is not None else chosen.l2_reg
            resolved.threshold = teacher.threshold if teacher.threshold is not None else chosen.threshold
        pool = ctx.features(teacher.spec, teacher.image_size, "unlabeled")
        probs = fit_probe_teacher(labeled, ctx.labels("labeled"), pool, num_classes, l2_reg=resolved.l2_reg)
        return probs, resolved, selection
    if teacher.kind == "propagation":
        specs = [teacher.spec, *teacher.extra_specs]
        subsets = ("labeled", "unlabeled", "val") if has_val else ("labeled", "unlabeled")
        feats = {s: [ctx.features(spec, teacher.image_size, s) for spec in specs] for s in subsets}
        options = dict(k=teacher.k, alpha=teacher.alpha, balance=teacher.balance)
        if has_val:
            probs, val_probs = propagate_with_validation(feats["labeled"], ctx.labels("labeled"), feats["unlabeled"],
                                                         feats["val"], num_classes, **options)
        else:
            probs, val_probs = label_propagation_teacher(feats["labeled"], ctx.labels("labeled"), feats["unlabeled"],
                                                         num_classes, **options), None
        if teacher.threshold is None:
            if val_probs is None:
                raise ValueError("teacher.kind=propagation with threshold: null chooses the threshold on the "
                                 "validation split; set data.val_per_class > 0 or a teacher.threshold")
            threshold, precision, rate = choose_confidence_threshold(val_probs, ctx.labels("val"),
                                                                     target_precision=teacher.target_precision)
            resolved.threshold = threshold
            selection = {"threshold": threshold, "selected_on": "validation", "precision": precision,
                         "accepted_rate": rate, "held_out": len(val_probs)}
        return probs, resolved, selection
    if teacher.threshold is None:
        # Zero-shot and ensemble teachers need no training data: their threshold is chosen on validation.
        if not has_val:
            raise ValueError(f"teacher.kind={teacher.kind} with threshold: null chooses the threshold on the "
                             "validation split; set data.val_per_class > 0 or a teacher.threshold")
        val_probs = _fixed_teacher_probabilities(ctx, teacher, "val")
        threshold, precision, rate = choose_confidence_threshold(val_probs, ctx.labels("val"),
                                                                 target_precision=teacher.target_precision)
        resolved.threshold = threshold
        selection = {"threshold": threshold, "selected_on": "validation", "precision": precision,
                     "accepted_rate": rate, "held_out": len(val_probs)}
    return _fixed_teacher_probabilities(ctx, teacher, "unlabeled"), resolved, selection


def teacher_probabilities(ctx: PrepareContext, teacher: TeacherParams) -> np.ndarray:
    """The teacher's class probabilities over the unlabeled pool ``(N_u, C)`` (driver side)."""
    return resolve_teacher(ctx, teacher)[0]


def _fixed_teacher_probabilities(ctx: PrepareContext, teacher: TeacherParams, subset: str) -> np.ndarray:
    """Probabilities of a teacher that needs no fitting (zero-shot, a saved ensemble) over a subset."""
    if teacher.kind == "zero_shot":
        backbone = create_backbone(teacher.spec, image_size=teacher.image_size)
        pool = ctx.features(teacher.spec, teacher.image_size, subset)
        return zero_shot_teacher(backbone, ctx.dataset.class_names, pool)
    from polyclip.ensemble import load_ensemble

    ensemble = load_ensemble(str(teacher.path))
    if list(ensemble.class_names) != list(ctx.dataset.class_names):
        raise ValueError(f"ensemble {teacher.path} predicts {ensemble.class_names}, the dataset has "
                         f"{ctx.dataset.class_names}")
    features = [ctx.features(b.spec, b.image_size, subset) for b in ensemble.backbones]
    return ensemble_teacher(ensemble, features)


@dataclass(frozen=True)
class SemiExtras:
    """The teacher as ``prepare`` resolved it (thresholds chosen on validation); ``None`` without one."""

    teacher: TeacherParams | None = None


def prepare(ctx: PrepareContext, params: SemiParams) -> Payload:
    payload = split_arrays(ctx, ctx.images)
    payload.extras = SemiExtras()
    if params.unlabeled_loss == "none" and params.teacher is None:
        return payload
    if params.teacher is None:
        payload.unlabeled = ctx.unlabeled()  # streamed to the workers; y is held back, logged only
        return payload
    probs, teacher_params, selection = resolve_teacher(ctx, params.teacher)
    payload.extras = SemiExtras(teacher_params)  # the worker builds its schedule from the resolved values
    if selection:
        payload.report["teacher_selection"] = selection
        logger.info("teacher %s: threshold %.3f%s chosen on %s (held-out precision %.3f)", params.teacher.kind,
                    teacher_params.threshold, f", l2_reg {teacher_params.l2_reg:g}" if teacher_params.l2_reg else "",
                    selection.get("selected_on"), selection.get("precision", float("nan")))
    schedule = schedule_of(teacher_params, ctx.cfg.train.epochs)
    held_back = ctx.labels("unlabeled")
    if len(held_back) == len(probs):  # a pool from an unlabeled source has no labels to check the teacher against
        report = pseudo_label_report(probs, held_back, ctx.dataset.class_names, schedule.values())
        report.update(kind=params.teacher.kind, spec=params.teacher.spec, schedule=params.teacher.schedule,
                      selection=selection or "set in the config")
        payload.report["teacher"] = report
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
    payload.unlabeled = pool
    return payload


def build_task(cfg: Any, params: SemiParams, payload: Payload) -> nn.Module:
    backbone = create_backbone(cfg.backbone.spec, image_size=cfg.backbone.image_size, in_chans=payload.in_chans)
    class_names = list(payload.class_names)
    num_classes = len(class_names)
    weak = fixmatch_weak(flip_p=params.flip_p, max_shift=params.max_shift)
    teacher = _resolved_teacher(params, payload)
    schedule = schedule_of(teacher, cfg.train.epochs) if teacher is not None else None
    common = dict(ema_decay=params.ema_decay, class_names=class_names, head_hidden=params.head_hidden,
                  head_depth=params.head_depth)
    if params.unlabeled_loss == "none":
        return PseudoLabelTask(backbone, num_classes, schedule=schedule, augment=weak,
                               pseudo_labels=teacher is not None,
                               weight=params.teacher.weight if params.teacher else 1.0, **common)  # type: ignore[arg-type]
    strong = fixmatch_strong(randaugment_n=params.randaugment_n, randaugment_m=params.randaugment_m,
                             cutout=params.cutout, flip_p=params.flip_p, max_shift=params.max_shift)
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


def _resolved_teacher(params: SemiParams, payload: Payload) -> TeacherParams | None:
    """The teacher's params as ``prepare`` resolved them (thresholds chosen on validation), else the config's."""
    extras = payload.extras
    if isinstance(extras, SemiExtras) and extras.teacher is not None:
        return extras.teacher
    return params.teacher


def streams(params: SemiParams) -> dict[str, tuple[str, int]]:
    """The labeled stream, plus the pool (``mu`` times the batch) unless supervised only."""
    if params.unlabeled_loss == "none" and params.teacher is None:
        return {"": ("train", 1)}
    return {"": ("train", 1), "u_": ("unlabeled", params.mu)}


def report(cfg: Any, params: SemiParams, payload: Payload, arrays: dict[str, np.ndarray]) -> dict[str, Any]:
    """``metrics["teacher_report"]``: per-class precision of accepted teacher labels, never-passing classes;
    ``metrics["teacher_selection"]``: the threshold chosen on validation and its held-out precision."""
    out = {"teacher_report": payload.report.get("teacher"),
           "teacher_selection": payload.report.get("teacher_selection")}
    return {key: value for key, value in out.items() if value is not None}


RECIPE = Recipe(params=SemiParams, prepare=prepare, build_task=build_task, streams=streams, report=report,
                extras=SemiExtras)
