"""SimCLR's two-view augmentation.

SimCLR (Chen et al., 2020) makes two views of each image with a random resized crop
(and horizontal flip), a strong colour distortion (jitter with probability 0.8, grayscale
with probability 0.2, both scaled by a strength ``s``) and a Gaussian blur with a kernel
about 10% of the image side. On CIFAR-sized images it skips the blur and uses ``s = 0.5``
(appendix B.9). The views are [0, 1] batches; normalisation comes afterwards, in the
backbone.
"""

from __future__ import annotations

from typing import Literal

import kornia.augmentation as K
import torch
from torch import nn

from polyclip.augment.blur import RandomGaussianBlur
from polyclip.augment.color import ColorJitter


def blur_kernel_size(image_size: int, fraction: float = 0.1) -> int:
    """An odd kernel side of about ``fraction * image_size``, at least 3 (23 for 224 px)."""
    k = max(3, int(fraction * image_size))
    return k if k % 2 == 1 else k + 1


class SimCLRAugment(nn.Module):
    """One random SimCLR view of each image in a [0, 1] batch.

    Crop (area ``scale``, aspect ``ratio``) resized to ``image_size``, horizontal flip,
    colour jitter ``(0.8s, 0.8s, 0.8s, 0.2s)`` with probability ``jitter_p``, grayscale
    with probability ``grayscale_p``, Gaussian blur with probability ``blur_p``. For
    1-channel input, saturation, hue and grayscale do nothing. Call it twice (or use
    :func:`simclr_views`) for the two views.

    Args:
        image_size: Side of the output views (the encoder's input size).
        scale: Range of the crop's area as a fraction of the image.
        ratio: Range of the crop's aspect ratio.
        flip_p: Probability of a horizontal flip.
        jitter_strength: The colour distortion strength ``s``.
        jitter_p: Probability that an image is colour-jittered.
        grayscale_p: Probability that an image is turned grey.
        blur_p: Probability that an image is blurred (0 disables blur).
        blur_kernel_fraction: Blur kernel side as a fraction of ``image_size``.
        blur_sigma: ``(low, high)`` range of the blur's sigma in pixels.

    Shapes:
        ``(B, C, H, W)`` float in [0, 1] with ``C`` in {1, 3} -> ``(B, C, image_size, image_size)``
        (the input's shape when it is already at ``image_size``, as from ``backbone.to_unit``).

    Example:
        >>> augment = SimCLRAugment(image_size=32, scale=(0.2, 1.0), blur_p=0.0)
        >>> view1, view2 = simclr_views(torch.rand(8, 3, 32, 32), augment)
    """

    def __init__(
        self,
        image_size: int,
        scale: tuple[float, float] = (0.08, 1.0),
        ratio: tuple[float, float] = (3 / 4, 4 / 3),
        flip_p: float = 0.5,
        jitter_strength: float = 1.0,
        jitter_p: float = 0.8,
        grayscale_p: float = 0.2,
        blur_p: float = 0.5,
        blur_kernel_fraction: float = 0.1,
        blur_sigma: tuple[float, float] = (0.1, 2.0),
    ) -> None:
        super().__init__()
        s = jitter_strength
        self.image_size = image_size
        self.blur_kernel_size = blur_kernel_size(image_size, blur_kernel_fraction)
        self.transform = nn.Sequential(
            K.RandomResizedCrop((image_size, image_size), scale=scale, ratio=ratio),
            K.RandomHorizontalFlip(p=flip_p),
            ColorJitter(0.8 * s, 0.8 * s, 0.8 * s, 0.2 * s, p=jitter_p),
            K.RandomGrayscale(p=grayscale_p),
            RandomGaussianBlur(p=blur_p, kernel_sizes=(self.blur_kernel_size,), sigma=blur_sigma),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.transform(x).clamp(0.0, 1.0)


def simclr_augment(image_size: int, preset: Literal["imagenet", "small"] = "imagenet") -> SimCLRAugment:
    """SimCLR's augmentation as used on ImageNet or on small (28-32 px) images.

    ``"imagenet"``: crop scale (0.08, 1), jitter strength 1, blur with probability 0.5 and a
    kernel of about 10% of the side. ``"small"``: crop scale (0.2, 1), since an 8% crop of a
    28 px image is a few pixels, jitter strength 0.5 and no blur, as SimCLR does on CIFAR-10.

    Args:
        image_size: Side of the output views.
        preset: ``"imagenet"`` or ``"small"``.

    Returns:
        The configured :class:`SimCLRAugment`.

    Example:
        >>> augment = simclr_augment(32, preset="small")
        >>> augment(torch.rand(4, 1, 32, 32)).shape
        torch.Size([4, 1, 32, 32])
    """
    if preset == "imagenet":
        return SimCLRAugment(image_size)
    if preset == "small":
        return SimCLRAugment(image_size, scale=(0.2, 1.0), jitter_strength=0.5, blur_p=0.0)
    raise ValueError(f"unknown SimCLR preset {preset!r}; valid: 'imagenet', 'small'")


def simclr_views(x: torch.Tensor, augment: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
    """Two independently augmented views of a [0, 1] batch.

    Args:
        x: ``(B, C, H, W)`` float in [0, 1].
        augment: A view augmentation, usually from :func:`simclr_augment`.

    Returns:
        ``(view1, view2)``, each ``augment(x)`` with its own random draws.

    Example:
        >>> v1, v2 = simclr_views(torch.rand(4, 3, 32, 32), simclr_augment(32, "small"))
        >>> v1.shape == v2.shape
        True
    """
    return augment(x), augment(x)
