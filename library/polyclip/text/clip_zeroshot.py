"""CLIP zero-shot heads: a pure function of (model, tokenizer, class names, templates).

As in the CLIP paper and open_clip's ``build_zero_shot_classifier``: every template is
filled with every class name, the texts are encoded and L2-normalised, averaged over
templates in embedding space, and the mean is normalised again. An image is scored by
its normalised feature times the class weights times the model's logit scale.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn.functional as F

Template = str | Callable[[str], str]

#: A short, general prompt set (open_clip's "simple" ImageNet templates plus the plain one).
SIMPLE_TEMPLATES: tuple[str, ...] = (
    "a photo of a {}.",
    "itap of a {}.",
    "a bad photo of the {}.",
    "a origami {}.",
    "a photo of the large {}.",
    "a {} in a video game.",
    "art of the {}.",
    "a photo of the small {}.",
    "a stylized {}.",
)

#: The 80 ImageNet prompts of the CLIP paper (Radford et al., 2021).
IMAGENET_TEMPLATES: tuple[str, ...] = (
    "a bad photo of a {}.", "a photo of many {}.", "a sculpture of a {}.", "a photo of the hard to see {}.",
    "a low resolution photo of the {}.", "a rendering of a {}.", "graffiti of a {}.", "a bad photo of the {}.",
    "a cropped photo of the {}.", "a tattoo of a {}.", "the embroidered {}.", "a photo of a hard to see {}.",
    "a bright photo of a {}.", "a photo of a clean {}.", "a photo of a dirty {}.", "a dark photo of the {}.",
    "a drawing of a {}.", "a photo of my {}.", "the plastic {}.", "a photo of the cool {}.",
    "a close-up photo of a {}.", "a black and white photo of the {}.", "a painting of the {}.",
    "a painting of a {}.", "a pixelated photo of the {}.", "a sculpture of the {}.", "a bright photo of the {}.",
    "a cropped photo of a {}.", "a plastic {}.", "a photo of the dirty {}.", "a jpeg corrupted photo of a {}.",
    "a blurry photo of the {}.", "a photo of the {}.", "a good photo of the {}.", "a rendering of the {}.",
    "a {} in a video game.", "a photo of one {}.", "a doodle of a {}.", "a close-up photo of the {}.",
    "a photo of a {}.", "the origami {}.", "the {} in a video game.", "a sketch of a {}.", "a doodle of the {}.",
    "a origami {}.", "a low resolution photo of a {}.", "the toy {}.", "a rendition of the {}.",
    "a photo of the clean {}.", "a photo of a large {}.", "a rendition of a {}.", "a photo of a nice {}.",
    "a photo of a weird {}.", "a blurry photo of a {}.", "a cartoon {}.", "art of a {}.", "a sketch of the {}.",
    "a embroidered {}.", "a pixelated photo of a {}.", "itap of the {}.", "a jpeg corrupted photo of the {}.",
    "a good photo of a {}.", "a plushie {}.", "a photo of the nice {}.", "a photo of the small {}.",
    "a photo of the weird {}.", "the cartoon {}.", "art of the {}.", "a drawing of the {}.",
    "a photo of the large {}.", "a black and white photo of a {}.", "the plushie {}.", "a dark photo of a {}.",
    "itap of a {}.", "graffiti of the {}.", "a toy {}.", "itap of my {}.", "a photo of a cool {}.",
    "a photo of a small {}.", "a tattoo of the {}.",
)


def fill_template(template: Template, class_name: str) -> str:
    """``"a photo of a {}."`` -> ``"a photo of a cat."``; callables are called with the name."""
    return template(class_name) if callable(template) else template.format(class_name)


def _text_encoder(model: Any, tokenizer: Callable[[list[str]], torch.Tensor] | None
                  ) -> tuple[Callable[[torch.Tensor], torch.Tensor], Callable[[list[str]], torch.Tensor]]:
    """``(tokens -> embeddings, texts -> tokens)`` for a polyclip Backbone or an open_clip model."""
    text_encoder = getattr(model, "text_encoder", None)
    if text_encoder is not None:  # a polyclip Backbone
        encode = text_encoder
        tokenizer = tokenizer or getattr(model, "tokenizer", None)
    elif hasattr(model, "encode_text"):
        encode = model.encode_text
    else:
        raise TypeError(f"{type(model).__name__} has no text encoder: pass a CLIP-family Backbone or open_clip model")
    if tokenizer is None:
        raise TypeError("no tokenizer given and the model carries none")
    return encode, tokenizer


def _device(model: Any) -> torch.device:
    params = getattr(model, "parameters", None)
    first = next(iter(params()), None) if callable(params) else None
    return first.device if first is not None else torch.device("cpu")


@torch.no_grad()
def zero_shot_classifier(model: Any, tokenizer: Callable[[list[str]], torch.Tensor] | None,
                         class_names: Sequence[str], templates: Sequence[Template] = SIMPLE_TEMPLATES,
                         *, batch_size: int = 256) -> torch.Tensor:
    """Class weights for zero-shot classification, ``(D, C)``.

    ``w_c = normalize(mean_t normalize(encode_text(template_t(c))))``

    Args:
        model: A CLIP-family :class:`polyclip.backbones.Backbone` (``has_text``) or an
            open_clip model (anything with ``encode_text(tokens)``).
        tokenizer: ``list[str] -> tokens``; None takes the Backbone's own.
        class_names: ``C`` class names, as they should read in a sentence.
        templates: Strings with one ``{}`` or callables ``name -> text``.
        batch_size: Texts per forward pass.

    Returns:
        ``(D, C)`` float32 with unit-norm columns (open_clip's layout):
        ``logits = normalize(image_features) @ weights * logit_scale``.

    Example:
        >>> bb = create_backbone("random:open_clip:RN50")  # doctest: +SKIP
        >>> w = zero_shot_classifier(bb, None, ["cat", "dog"], ["a photo of a {}."])  # (1024, 2)
    """
    if not class_names or not templates:
        raise ValueError("need at least one class name and one template")
    encode, tokenize = _text_encoder(model, tokenizer)
    device = _device(model)
    texts = [fill_template(t, name) for name in class_names for t in templates]
    chunks = [encode(tokenize(texts[i:i + batch_size]).to(device)).float() for i in range(0, len(texts), batch_size)]
    embeddings = F.normalize(torch.cat(chunks), dim=-1).reshape(len(class_names), len(templates), -1)
    weights = F.normalize(embeddings.mean(dim=1), dim=-1)
    return weights.T.contiguous()


def zero_shot_logits(image_features: torch.Tensor, weights: torch.Tensor,
                     logit_scale: float | torch.Tensor = 100.0) -> torch.Tensor:
    """Zero-shot logits: ``logit_scale * normalize(image_features) @ weights``.

    Args:
        image_features: ``(B, D)`` image embeddings (any norm).
        weights: ``(D, C)`` from :func:`zero_shot_classifier`.
        logit_scale: The model's temperature (``Backbone.logit_scale``; 100 for trained CLIP).

    Returns:
        ``(B, C)`` logits.
    """
    return logit_scale * (F.normalize(image_features.float(), dim=-1) @ weights.to(image_features.device))


__all__ = ["IMAGENET_TEMPLATES", "SIMPLE_TEMPLATES", "Template", "fill_template", "zero_shot_classifier",
           "zero_shot_logits"]
