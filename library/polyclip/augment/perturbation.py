"""Perturbations for supervised training, after the CES paper.

"Improving Image Classification Robustness with CLIP-guided CES loss" (Tiny-ImageNet)
perturbs 10% of training images with RGB salt-and-pepper noise, blurs each image with
probability 0.66 using a 1x1 or 3x3 Gaussian kernel, and adds horizontal flips and
brightness / contrast / saturation / hue jitter. The modules here do that on a batch of
[0, 1] images on the training device; normalisation comes afterwards, in the backbone.
"""

from __future__ import annotations

from collections.abc import Sequence

import kornia.augmentation as K
import torch
from torch import nn

from polyclip.augment.blur import RandomGaussianBlur
from polyclip.augment.color import ColorJitter


class SaltPepperNoise(nn.Module):
    """RGB salt-and-pepper noise on a random share of the images.

    Each image is noised with probability ``p``. In a noised image every pixel-channel
    value is, independently with probability ``amount``, replaced by 1 (salt, with
    probability ``salt_ratio``) or 0 (pepper). Channels are drawn independently, so a hit
    pixel usually becomes a coloured speck rather than black or white: the CES paper uses
    RGB noise "to simulate the variability the model might encounter during test time".

    Args:
        p: Probability that an image is noised (the paper: 0.1).
        amount: Expected fraction of pixel-channel values replaced in a noised image.
        salt_ratio: Probability that a replaced value is 1 rather than 0.

    Shapes:
        ``(B, C, H, W)`` float in [0, 1] -> same shape and dtype.

    Example:
        >>> noise = SaltPepperNoise(p=0.1, amount=0.05)
        >>> noise(torch.rand(8, 3, 32, 32)).shape
        torch.Size([8, 3, 32, 32])
    """

    def __init__(self, p: float = 0.1, amount: float = 0.05, salt_ratio: float = 0.5) -> None:
        super().__init__()
        for name, value in (("p", p), ("amount", amount), ("salt_ratio", salt_ratio)):
            if not 0.0 <= value <= 1.0:
                raise ValueError(f"{name} must be in [0, 1], got {value}")
        self.p = p
        self.amount = amount
        self.salt_ratio = salt_ratio

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        noised = (torch.rand(x.shape[0], device=x.device) < self.p).nonzero().squeeze(1)
        if noised.numel() == 0:
            return x
        # Noise only the chosen images: with the paper's p = 0.1 this draws a tenth of the numbers.
        shape = (noised.numel(), *x.shape[1:])
        hit = torch.rand(shape, device=x.device) < self.amount
        salt = (torch.rand(shape, device=x.device) < self.salt_ratio).to(x.dtype)
        out = x.clone()
        out[noised] = torch.where(hit, salt, x[noised])
        return out


def perturbation_pipeline(
    noise_p: float = 0.1,
    noise_amount: float = 0.05,
    noise_salt_ratio: float = 0.5,
    blur_p: float = 0.66,
    blur_kernel_sizes: Sequence[int] = (1, 3),
    blur_sigma: tuple[float, float] = (0.1, 2.0),
    flip_p: float = 0.5,
    brightness: float = 0.2,
    contrast: float = 0.2,
    saturation: float = 0.2,
    hue: float = 0.05,
    jitter_p: float = 1.0,
) -> nn.Sequential:
    """The CES paper's training perturbations as one module on [0, 1] batches.

    Order: horizontal flip, colour jitter, Gaussian blur, salt-and-pepper noise. The noise
    comes last so that the values it writes stay exactly 0 or 1, like the corrupted pixels
    it stands for; blur and jitter act on the clean image. The output is still in [0, 1]
    and NOT normalised: the caller applies ``backbone.normalize`` after it, e.g.
    ``backbone.normalize(augment(backbone.to_unit(images)))``.

    The paper gives the noise share (10% of images), the blur probability (0.66) and
    kernels ({1, 3}); it does not give the noise density, the blur sigma or the jitter
    strengths, so those defaults are mild choices of ours.

    Args:
        noise_p: Share of images that get salt-and-pepper noise.
        noise_amount: Fraction of pixel-channel values replaced in a noised image.
        noise_salt_ratio: Probability that a replaced value is 1 rather than 0.
        blur_p: Probability that an image is blurred.
        blur_kernel_sizes: Kernel sides to choose from (1 = identity).
        blur_sigma: ``(low, high)`` range of the blur's sigma in pixels.
        flip_p: Probability of a horizontal flip.
        brightness: Brightness jitter strength.
        contrast: Contrast jitter strength.
        saturation: Saturation jitter strength (ignored for 1-channel input).
        hue: Hue jitter strength (ignored for 1-channel input).
        jitter_p: Probability that an image is colour-jittered.

    Returns:
        ``nn.Sequential`` mapping ``(B, C, H, W)`` float in [0, 1] to the same shape.

    Example:
        >>> augment = perturbation_pipeline()
        >>> augment(torch.rand(4, 3, 64, 64)).shape
        torch.Size([4, 3, 64, 64])
    """
    return nn.Sequential(
        K.RandomHorizontalFlip(p=flip_p),
        ColorJitter(brightness, contrast, saturation, hue, p=jitter_p),
        RandomGaussianBlur(p=blur_p, kernel_sizes=blur_kernel_sizes, sigma=blur_sigma),
        SaltPepperNoise(p=noise_p, amount=noise_amount, salt_ratio=noise_salt_ratio),
    )
