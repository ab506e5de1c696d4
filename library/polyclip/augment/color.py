"""Colour jitter that also accepts grayscale batches."""

from __future__ import annotations

import kornia.augmentation as K
import torch
from torch import nn


class ColorJitter(nn.Module):
    """Random brightness, contrast, saturation and hue, per image, on [0, 1] batches.

    A thin wrapper over :class:`kornia.augmentation.ColorJitter` (which draws one factor
    of each kind per image and applies the four in a random order). Saturation and hue
    are undefined for one channel, and kornia raises on them, so a 1-channel batch gets
    brightness and contrast only.

    Args:
        brightness: Brightness factor drawn from ``[max(0, 1 - brightness), 1 + brightness]``.
        contrast: Contrast factor drawn from ``[max(0, 1 - contrast), 1 + contrast]``.
        saturation: Saturation factor drawn from ``[max(0, 1 - saturation), 1 + saturation]``.
        hue: Hue shift drawn from ``[-hue, hue]`` (in turns, at most 0.5).
        p: Probability that an image is jittered at all.

    Shapes:
        ``(B, C, H, W)`` float in [0, 1] with ``C`` in {1, 3} -> same shape, in [0, 1].

    Example:
        >>> jitter = ColorJitter(0.4, 0.4, 0.4, 0.1, p=0.8)
        >>> jitter(torch.rand(8, 1, 28, 28)).shape
        torch.Size([8, 1, 28, 28])
    """

    def __init__(self, brightness: float = 0.0, contrast: float = 0.0, saturation: float = 0.0, hue: float = 0.0,
                 p: float = 1.0) -> None:
        super().__init__()
        self.rgb = K.ColorJitter(brightness, contrast, saturation, hue, p=p)
        self.gray = K.ColorJitter(brightness, contrast, 0.0, 0.0, p=p)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[0] == 0:
            return x
        out = self.gray(x) if x.shape[1] == 1 else self.rgb(x)
        return out.clamp(0.0, 1.0)
