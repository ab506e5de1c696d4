"""``method.name: finetune``: train a backbone and a head end to end on labeled images."""

from __future__ import annotations

from typing import Any, Literal

from polyclip.backbones import create_backbone
from polyclip.methods.supervised import SupervisedTask
from pydantic import Field

from jobs.recipes.base import MethodParams, PrepareContext, Recipe, split_arrays


class FinetuneParams(MethodParams):
    name: Literal["finetune"] = "finetune"
    freeze_backbone: bool = False
    head_hidden: int = Field(0, ge=0)
    head_depth: int = Field(1, ge=1)


def prepare(ctx: PrepareContext, params: FinetuneParams) -> dict[str, Any]:
    payload: dict[str, Any] = split_arrays(ctx, ctx.images)
    payload["info"] = {}
    return payload


def build_task(cfg: Any, params: FinetuneParams, payload: dict[str, Any]) -> SupervisedTask:
    in_chans = int(payload["train"]["x"].shape[1])
    backbone = create_backbone(cfg.backbone.spec, image_size=cfg.backbone.image_size,
                               in_chans=in_chans if cfg.backbone.spec.startswith(("random:", "pixels")) else None)
    return SupervisedTask(backbone, len(payload["class_names"]), freeze_backbone=params.freeze_backbone,
                          head_hidden=params.head_hidden, head_depth=params.head_depth)


RECIPE = Recipe(params=FinetuneParams, prepare=prepare, build_task=build_task)
