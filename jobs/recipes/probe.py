"""``method.name: probe``: a linear or MLP probe on cached features of any backbone."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field

from jobs.recipes.base import MethodParams, Payload, PrepareContext, Recipe, split_arrays
from polyclip.methods.probe import ProbeTask


class ProbeParams(MethodParams):
    name: Literal["probe"] = "probe"
    hidden: int = Field(0, ge=0, description="hidden width; 0 with depth 1 is a linear probe")
    depth: int = Field(1, ge=1)
    dropout: float = Field(0.0, ge=0, lt=1)
    l2_normalize: bool = True


def prepare(ctx: PrepareContext, params: ProbeParams) -> Payload:
    spec, size = ctx.cfg.backbone.spec, ctx.cfg.backbone.image_size
    return split_arrays(ctx, lambda s: ctx.features(spec, size, s))


def build_task(cfg: Any, params: ProbeParams, payload: Payload) -> ProbeTask:
    return ProbeTask(payload.input_shape[0], payload.num_classes, hidden=params.hidden,
                     depth=params.depth, dropout=params.dropout, l2_normalize=params.l2_normalize)


RECIPE = Recipe(params=ProbeParams, prepare=prepare, build_task=build_task)
