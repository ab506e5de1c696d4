"""``method.name: simclr``: self-supervised pretraining of the backbone on unlabeled images.

The contrastive stream ``u_`` holds the images of the unlabeled pool (and, by default,
the labeled images too, without their labels); the labeled stream trains the online
linear probe that gives every pretraining run its val/test accuracy. The trained encoder
lands in ``<run_dir>/checkpoint/backbone/``, so ``backbone.spec:
checkpoint:<run_dir>/checkpoint`` reuses it in every other job.
"""

from __future__ import annotations

from typing import Any, Literal

import numpy as np
from pydantic import Field

from jobs.recipes.base import MethodParams, Payload, PrepareContext, Recipe, split_arrays
from jobs.streaming import with_arrays
from polyclip.augment.simclr import SimCLRAugment, simclr_augment
from polyclip.backbones import create_backbone
from polyclip.methods.simclr import SimCLRTask


class SimCLRParams(MethodParams):
    name: Literal["simclr"] = "simclr"
    temperature: float = Field(0.5, gt=0, description="NT-Xent tau")
    projection_hidden: int = Field(0, ge=0, description="hidden width of the projection MLP; 0 = encoder width")
    projection_dim: int = Field(128, ge=1)
    gather_negatives: bool = Field(True, description="negatives from every worker (cluster-wide batch)")
    augment: Literal["small", "imagenet"] = Field("small", description="view preset: 28-32 px data or ImageNet")
    crop_min_scale: float | None = Field(None, gt=0, le=1, description="override the preset's crop scale floor")
    jitter_strength: float | None = Field(None, ge=0, description="override the colour distortion strength s")
    blur_p: float | None = Field(None, ge=0, le=1, description="override the blur probability")
    include_labeled_images: bool = Field(True, description="the labeled images join the contrastive pool")


def build_augment(params: SimCLRParams, image_size: int) -> SimCLRAugment:
    """The preset's views, with any overridden knob."""
    preset = simclr_augment(image_size, params.augment)
    if params.crop_min_scale is None and params.jitter_strength is None and params.blur_p is None:
        return preset
    small = params.augment == "small"
    return SimCLRAugment(
        image_size,
        scale=(params.crop_min_scale or (0.2 if small else 0.08), 1.0),
        jitter_strength=params.jitter_strength if params.jitter_strength is not None else (0.5 if small else 1.0),
        blur_p=params.blur_p if params.blur_p is not None else (0.0 if small else 0.5),
    )


def prepare(ctx: PrepareContext, params: SimCLRParams) -> Payload:
    payload = split_arrays(ctx, ctx.images)
    # Labels of the pool are never shipped: only x travels.
    pool = ctx.unlabeled(held_back_labels=False)
    labeled = ctx.images("labeled") if params.include_labeled_images else None
    if isinstance(pool, dict):
        images = pool["x"] if labeled is None else np.concatenate([pool["x"], labeled])
        count, pool = len(images), {"x": images}
    else:
        if labeled is not None:
            pool = with_arrays(pool, {"x": labeled})
        count = pool.num_rows
    if count < 2:
        raise ValueError(
            f"SimCLR needs an image pool of at least 2 images, got {count} "
            f"(data.unlabeled={ctx.cfg.data.unlabeled}, include_labeled_images={params.include_labeled_images})"
        )
    payload.unlabeled = pool
    payload.report["pretrain_images"] = count
    return payload


def build_task(cfg: Any, params: SimCLRParams, payload: Payload) -> SimCLRTask:
    backbone = create_backbone(cfg.backbone.spec, image_size=cfg.backbone.image_size, in_chans=payload.in_chans)
    backbone.train()
    return SimCLRTask(backbone, payload.num_classes, build_augment(params, backbone.preprocessing.image_size),
                      projection_hidden=params.projection_hidden, projection_dim=params.projection_dim,
                      temperature=params.temperature, gather_negatives=params.gather_negatives)


def report(cfg: Any, params: SimCLRParams, payload: Payload, arrays: dict[str, np.ndarray]) -> dict[str, Any]:
    """``metrics["pretrain_images"]``: images the contrastive loss saw (the pool, plus the labeled ones)."""
    return {"pretrain_images": payload.report["pretrain_images"]}


def streams(params: SimCLRParams) -> dict[str, tuple[str, int]]:
    return {"": ("train", 1), "u_": ("unlabeled", 1)}


RECIPE = Recipe(params=SimCLRParams, prepare=prepare, build_task=build_task, streams=streams, report=report)
