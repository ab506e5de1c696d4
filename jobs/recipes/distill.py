"""``method.name: distill``: a student encoder learns a teacher's embeddings and the labels at once.

The teacher is any backbone of the factory (``teacher``, at ``teacher_image_size``); its
embeddings come from the feature cache (encoded once, in parallel on the cluster). The
student is ``backbone.spec`` (e.g. ``random:small_cnn`` for 28x28 images). With
``distill_unlabeled: true`` the unlabeled pool is extra distillation data for the cosine
term (a ``u_`` stream of ``mu`` times the labeled batch size).

The baselines of the same family are plain ``probe`` configs: "teacher + classifier" is
``probe`` with ``depth: 4, hidden: 256`` on the teacher's features, and "classifier" the
same probe on ``backbone.spec: pixels``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

from pydantic import Field

from jobs.recipes.base import MethodParams, Payload, PrepareContext, Recipe, split_arrays
from polyclip.backbones import create_backbone
from polyclip.methods.distill import DistillTask


class DistillParams(MethodParams):
    name: Literal["distill"] = "distill"
    teacher: str = Field("efficientnet_lite:0", description="teacher backbone spec (factory)")
    teacher_image_size: int | None = Field(None, gt=0, description="teacher input size; null for its default")
    w_cos: float = Field(1.0, ge=0)
    w_ce: float = Field(1.0, ge=0)
    mlp_hidden: int = Field(256, gt=0)
    mlp_depth: int = Field(4, ge=1)
    distill_unlabeled: bool = Field(False, description="also imitate the teacher on the unlabeled pool")
    mu: int = Field(1, ge=1, description="unlabeled batch = mu * labeled batch")


@dataclass(frozen=True)
class DistillExtras:
    """What the student's task needs besides the data: the teacher's embedding width."""

    teacher_dim: int


def prepare(ctx: PrepareContext, params: DistillParams) -> Payload:
    if ctx.cfg.backbone.spec.startswith("pixels"):
        raise ValueError("method distill needs a trainable student in backbone.spec (e.g. random:small_cnn), "
                         "got 'pixels'")
    payload = split_arrays(ctx, ctx.images)
    payload.train["teacher"] = ctx.features(params.teacher, params.teacher_image_size, "labeled")
    if params.distill_unlabeled:
        if ctx.pool_size() == 0:
            raise ValueError("method.distill_unlabeled is true but the unlabeled pool is empty (data.unlabeled: 0?)")
        # No labels in this stream: it only imitates the teacher.
        payload.unlabeled = ctx.unlabeled(
            {"teacher": ctx.features(params.teacher, params.teacher_image_size, "unlabeled")}, held_back_labels=False)
    payload.extras = DistillExtras(teacher_dim=int(payload.train["teacher"].shape[1]))
    return payload


def build_task(cfg: Any, params: DistillParams, payload: Payload) -> DistillTask:
    student = create_backbone(cfg.backbone.spec, image_size=cfg.backbone.image_size, in_chans=payload.in_chans)
    return DistillTask(student, payload.extras.teacher_dim, payload.num_classes, w_cos=params.w_cos,
                       w_ce=params.w_ce, mlp_hidden=params.mlp_hidden, mlp_depth=params.mlp_depth)


def streams(params: DistillParams) -> dict[str, tuple[str, int]]:
    if params.distill_unlabeled:
        return {"": ("train", 1), "u_": ("unlabeled", params.mu)}
    return {"": ("train", 1)}


RECIPE = Recipe(params=DistillParams, prepare=prepare, build_task=build_task, streams=streams, extras=DistillExtras)
