"""``method.name: finetune``: train a backbone and a head end to end on labeled images.

Options of the language-guided supervised issue:

* ``loss: ces`` trains with the Cross-Entropy-Similarity loss
  (:class:`polyclip.losses.CESLoss`); it needs the job's ``word_vectors:`` section. The
  label similarity matrix is computed once here, on the driver, shipped in the
  payload and kept on the training device as a buffer of the loss, so the training step
  never looks up a word vector.
* ``augment: perturbation`` applies the CES paper's perturbations
  (:func:`polyclip.augment.perturbation.perturbation_pipeline`) on the training device,
  to training batches only; every probability is a key of ``perturbation:``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import torch
from pydantic import Field

from jobs.config_base import StrictModel
from jobs.recipes.base import MethodParams, Payload, PrepareContext, Recipe, split_arrays
from polyclip.augment.perturbation import perturbation_pipeline
from polyclip.backbones import create_backbone
from polyclip.losses.ces import CESLoss
from polyclip.methods.supervised import SupervisedTask


class PerturbationParams(StrictModel):
    """Arguments of :func:`polyclip.augment.perturbation.perturbation_pipeline` (same names, same defaults)."""

    noise_p: float = Field(0.1, ge=0, le=1, description="share of images with salt-and-pepper noise (paper: 0.1)")
    noise_amount: float = Field(0.05, ge=0, le=1)
    noise_salt_ratio: float = Field(0.5, ge=0, le=1)
    blur_p: float = Field(0.66, ge=0, le=1, description="probability of a Gaussian blur (paper: 0.66)")
    blur_kernel_sizes: tuple[int, ...] = Field((1, 3), min_length=1, description="odd kernel sides (paper: 1, 3)")
    blur_sigma: tuple[float, float] = (0.1, 2.0)
    flip_p: float = Field(0.5, ge=0, le=1)
    brightness: float = Field(0.2, ge=0)
    contrast: float = Field(0.2, ge=0)
    saturation: float = Field(0.2, ge=0)
    hue: float = Field(0.05, ge=0, le=0.5)
    jitter_p: float = Field(1.0, ge=0, le=1)


class FinetuneParams(MethodParams):
    name: Literal["finetune"] = "finetune"
    freeze_backbone: bool = False
    head_hidden: int = Field(0, ge=0)
    head_depth: int = Field(1, ge=1)
    loss: Literal["ce", "ces"] = Field("ce", description="ces needs the job's word_vectors section")
    ces_w_ce: float = Field(0.8, ge=0, description="CES weight of cross-entropy (paper: 0.8)")
    ces_w_sim: float = Field(0.2, ge=0, description="CES weight of the similarity term (paper: 0.2)")
    ces_mode: Literal["hard", "soft"] = Field(
        "hard", description="hard: the paper's equation (cross-entropy scaled by the semantic distance of the "
                            "predicted label); soft: cross-entropy plus the expected semantic distance")
    augment: Literal["none", "perturbation"] = "none"
    perturbation: PerturbationParams = Field(default_factory=lambda: PerturbationParams.model_validate({}))


def check_job(cfg: Any, params: FinetuneParams) -> None:
    """Cross-field checks the params model cannot do (it does not see the rest of the config).

    Raises:
        ValueError: ``method.loss: ces`` without a ``word_vectors`` section.
    """
    if params.loss == "ces" and cfg.word_vectors is None:
        raise ValueError(
            "method.loss is 'ces' but the config has no word_vectors section: CES needs the labels' word "
            "vectors; add e.g. `word_vectors: {source: glove-6b-50d}` or set method.loss: ce"
        )


@dataclass(frozen=True)
class FinetuneExtras:
    """The label similarity matrix ``(C, C)`` of CES (``None`` with cross-entropy)."""

    similarity: np.ndarray | None = None


def prepare(ctx: PrepareContext, params: FinetuneParams) -> Payload:
    check_job(ctx.cfg, params)
    similarity = None
    if params.loss == "ces":
        from jobs.semantics import label_similarity

        # Fails here, before training, naming every label without a vector.
        similarity = label_similarity(ctx.cfg.word_vectors, ctx.dataset.class_names)
    payload = split_arrays(ctx, ctx.images)
    payload.extras = FinetuneExtras(similarity)
    return payload


def build_loss(params: FinetuneParams, payload: Payload) -> torch.nn.Module:
    """Cross-entropy, or CES with the payload's similarity matrix."""
    if params.loss == "ce":
        return torch.nn.CrossEntropyLoss()
    similarity = payload.extras.similarity if payload.extras is not None else None
    if similarity is None:
        raise ValueError("method.loss is 'ces' but the payload has no label similarity matrix (run prepare first)")
    return CESLoss(torch.as_tensor(similarity), w_ce=params.ces_w_ce, w_sim=params.ces_w_sim, mode=params.ces_mode)


def build_task(cfg: Any, params: FinetuneParams, payload: Payload) -> SupervisedTask:
    backbone = create_backbone(cfg.backbone.spec, image_size=cfg.backbone.image_size, in_chans=payload.in_chans)
    augment = perturbation_pipeline(**params.perturbation.model_dump()) if params.augment == "perturbation" else None
    return SupervisedTask(backbone, payload.num_classes, loss_fn=build_loss(params, payload),
                          augment=augment, freeze_backbone=params.freeze_backbone,
                          head_hidden=params.head_hidden, head_depth=params.head_depth)


RECIPE = Recipe(params=FinetuneParams, prepare=prepare, build_task=build_task, check=check_job,
                extras=FinetuneExtras)
