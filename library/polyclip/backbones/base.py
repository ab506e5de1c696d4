"""The one image-encoder interface every part of polyclip goes through.

A :class:`Backbone` wraps any encoder (timm, open_clip, a polyclip checkpoint, raw
pixels) behind ``forward_features(x) -> (B, D)`` plus the preprocessing it expects, so
probes, distillation, pseudo-labels, the ensemble and serving never branch on where a
model came from.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn


@dataclass(frozen=True)
class Preprocessing:
    """How raw images become model inputs.

    Attributes:
        image_size: Side length the encoder sees.
        mean: Per-channel mean on the [0, 1] scale.
        std: Per-channel standard deviation on the [0, 1] scale.
        in_chans: Channels the encoder expects (grayscale input is repeated to match).
    """

    image_size: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    in_chans: int = 3

    def key(self) -> str:
        """A stable string for cache keys."""
        return f"{self.image_size}|{self.mean}|{self.std}|{self.in_chans}"


def images_to_unit(images: torch.Tensor, prep: Preprocessing) -> torch.Tensor:
    """Raw images to float [0, 1] at the encoder's size and channel count (no normalisation).

    Augmentations act on this form; :func:`normalize_images` comes after them.

    Args:
        images: ``uint8`` ``(B, C, H, W)`` in [0, 255], or float in [0, 1].
        prep: The encoder's preprocessing.
    """
    x = images.float().div(255.0) if images.dtype == torch.uint8 else images.float()
    if x.shape[1] == 1 and prep.in_chans == 3:
        x = x.expand(-1, 3, -1, -1)
    elif x.shape[1] == 3 and prep.in_chans == 1:
        x = x.mean(dim=1, keepdim=True)
    if x.shape[-1] != prep.image_size or x.shape[-2] != prep.image_size:
        x = F.interpolate(x, size=(prep.image_size, prep.image_size), mode="bilinear", align_corners=False,
                          antialias=x.shape[-1] > prep.image_size)
    return x.contiguous()


def normalize_images(x: torch.Tensor, prep: Preprocessing) -> torch.Tensor:
    """Subtract the encoder's mean and divide by its std (``x`` in [0, 1])."""
    mean = torch.tensor(prep.mean, device=x.device, dtype=x.dtype).view(1, -1, 1, 1)
    std = torch.tensor(prep.std, device=x.device, dtype=x.dtype).view(1, -1, 1, 1)
    return (x - mean) / std


def preprocess_images(images: torch.Tensor, prep: Preprocessing) -> torch.Tensor:
    """Turn a batch of raw images into normalised encoder input.

    Args:
        images: ``uint8`` ``(B, C, H, W)`` in [0, 255], or float in [0, 1].
        prep: The encoder's preprocessing.

    Returns:
        float ``(B, prep.in_chans, image_size, image_size)``.
    """
    return normalize_images(images_to_unit(images, prep), prep)


class Backbone(nn.Module):
    """An image encoder with its preprocessing.

    Args:
        spec: The factory spec it was built from (``efficientnet_lite:0``...).
        encoder: Module mapping normalised images ``(B, C, S, S)`` to ``(B, D)``.
        num_features: ``D``.
        preprocessing: What :meth:`encode` applies to raw images.
        text_encoder: For CLIP-family backbones, a callable ``tokens -> (T, D)``.
        tokenizer: For CLIP-family backbones, ``list[str] -> tokens``.

    Example:
        >>> bb = create_backbone("random:small_cnn")  # doctest: +SKIP
        >>> feats = bb.encode(torch.zeros(2, 1, 28, 28, dtype=torch.uint8))  # (2, bb.num_features)
    """

    def __init__(
        self,
        spec: str,
        encoder: nn.Module,
        num_features: int,
        preprocessing: Preprocessing,
        text_encoder: nn.Module | None = None,
        tokenizer: object | None = None,
        logit_scale: float | None = None,
    ) -> None:
        super().__init__()
        self.spec = spec
        self.encoder = encoder
        self.num_features = num_features
        self.preprocessing = preprocessing
        self.text_encoder = text_encoder
        self.tokenizer = tokenizer
        self.logit_scale = logit_scale

    @property
    def has_text(self) -> bool:
        """True for CLIP-family backbones, which also encode text."""
        return self.text_encoder is not None and self.tokenizer is not None

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """Embed preprocessed images: ``(B, C, S, S) -> (B, num_features)``."""
        out = self.encoder(x)
        return out.flatten(1) if out.ndim > 2 else out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_features(x)

    def preprocess(self, images: torch.Tensor) -> torch.Tensor:
        """Resize and normalise raw images (``uint8`` or [0, 1] floats) for this encoder."""
        return preprocess_images(images, self.preprocessing)

    def to_unit(self, images: torch.Tensor) -> torch.Tensor:
        """Raw images to [0, 1] floats at this encoder's size (augment these)."""
        return images_to_unit(images, self.preprocessing)

    def normalize(self, x: torch.Tensor) -> torch.Tensor:
        """Normalise [0, 1] images for this encoder."""
        return normalize_images(x, self.preprocessing)

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """Preprocess raw images and embed them."""
        return self.forward_features(self.preprocess(images))

    @torch.no_grad()
    def encode_text(self, texts: list[str]) -> torch.Tensor:
        """Embed texts (CLIP-family backbones only): ``list[str] -> (T, num_features)``."""
        if not self.has_text:
            raise TypeError(f"backbone {self.spec!r} has no text encoder (only open_clip backbones do)")
        tokens = self.tokenizer(texts)  # type: ignore[misc,operator]
        device = next(self.parameters()).device
        return self.text_encoder(tokens.to(device))  # type: ignore[misc]
