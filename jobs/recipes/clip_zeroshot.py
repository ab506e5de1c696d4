"""``method.name: clip_zeroshot``: a CLIP prompt classifier, evaluated without training.

The config of ``python -m jobs.zeroshot_eval`` (it is a normal job config, so it is
validated like every other). ``prepare`` encodes the test images through the feature
cache; the head itself is built by :func:`build_head` from the backbone's text tower.
There is nothing to train: the recipe has no ``build_task`` but
``evaluated_by="jobs.zeroshot_eval"``, and ``jobs.train`` refuses the method with a
pointer to that job before it loads any data.
"""

from __future__ import annotations

from typing import Literal

import numpy as np
import torch
from pydantic import Field, field_validator

from jobs.recipes.base import MethodParams, Payload, PrepareContext, Recipe
from polyclip.backbones.base import Backbone
from polyclip.text.clip_zeroshot import IMAGENET_TEMPLATES, SIMPLE_TEMPLATES, zero_shot_classifier

TEMPLATE_SETS: dict[str, tuple[str, ...]] = {"none": (), "simple": SIMPLE_TEMPLATES, "imagenet": IMAGENET_TEMPLATES}


class ClipZeroShotParams(MethodParams):
    name: Literal["clip_zeroshot"] = "clip_zeroshot"
    templates: list[str] = Field(default_factory=lambda: ["a photo of a {}."],
                                 description="prompt templates with one '{}'; averaged in embedding space")
    template_set: Literal["none", "simple", "imagenet"] = Field(
        "none", description="add a packaged template ensemble (simple: 9 prompts, imagenet: the CLIP paper's 80)")
    class_prompts: dict[str, str] = Field(default_factory=dict,
                                          description="class name -> the text put into the templates")
    unseen_classes: list[str] = Field(default_factory=list, description="zero-shot protocol split (report only)")
    num_unseen: int = Field(0, ge=0, description="without names: this many unseen classes drawn with the job seed")
    text_batch_size: int = Field(256, gt=0)

    @field_validator("templates")
    @classmethod
    def _one_slot(cls, value: list[str]) -> list[str]:
        bad = [t for t in value if t.count("{}") != 1]
        if bad:
            raise ValueError(f"every template needs exactly one '{{}}' for the class name; bad: {bad}")
        return value

    def all_templates(self) -> list[str]:
        """The configured templates followed by the chosen set (duplicates dropped, order kept)."""
        return list(dict.fromkeys([*self.templates, *TEMPLATE_SETS[self.template_set]]))


def prompt_names(class_names: list[str], class_prompts: dict[str, str]) -> list[str]:
    """The text of each class inside a prompt (``class_prompts`` overrides, else the name).

    Raises:
        ValueError: ``class_prompts`` names a class the dataset does not have.
    """
    unknown = sorted(set(class_prompts) - set(class_names))
    if unknown:
        raise ValueError(f"class_prompts names unknown classes {unknown}; valid: {class_names}")
    return [class_prompts.get(name, name) for name in class_names]


def build_head(backbone: Backbone, class_names: list[str], params: ClipZeroShotParams) -> torch.Tensor:
    """Zero-shot class weights ``(D, C)`` from the backbone's text tower.

    Raises:
        ValueError: The backbone has no text tower (not an open_clip spec).
    """
    if not backbone.has_text:
        raise ValueError(f"backbone {backbone.spec!r} has no text encoder; CLIP zero-shot needs an open_clip spec "
                         "such as open_clip:ViT-B-32/openai or open_clip:ViT-B-32@/path/to/weights.pt")
    return zero_shot_classifier(backbone, None, prompt_names(class_names, params.class_prompts),
                                params.all_templates(), batch_size=params.text_batch_size)


def prepare(ctx: PrepareContext, params: ClipZeroShotParams) -> Payload:
    prompt_names(list(ctx.dataset.class_names), params.class_prompts)  # fail before encoding anything
    spec, size = ctx.cfg.backbone.spec, ctx.cfg.backbone.image_size
    test = {"x": ctx.features(spec, size, "test"), "y": ctx.labels("test")}
    empty = {"x": test["x"][:0], "y": test["y"][:0]}  # nothing to train or select on
    return Payload(train=empty, val=dict(empty), test=test, class_names=list(ctx.dataset.class_names))


def zero_shot_scores(features: np.ndarray, weights: torch.Tensor, logit_scale: float) -> np.ndarray:
    """``logit_scale * normalize(features) @ weights`` as numpy ``(N, C)``."""
    from polyclip.text.clip_zeroshot import zero_shot_logits

    return zero_shot_logits(torch.from_numpy(np.asarray(features)), weights, logit_scale).numpy()


RECIPE = Recipe(params=ClipZeroShotParams, prepare=prepare, build_task=None, evaluated_by="jobs.zeroshot_eval")
