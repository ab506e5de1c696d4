"""Batch augmentations on [0, 1] images, on the training device (kornia).

Every module maps a float ``(B, C, H, W)`` batch in [0, 1] to the same shape, draws from
torch's global RNG (so ``torch.manual_seed`` makes it reproducible), and works for 1 and 3
channels. Use it between ``backbone.to_unit(images)`` and ``backbone.normalize(x)``.
"""

from polyclip.augment.blur import RandomGaussianBlur
from polyclip.augment.color import ColorJitter
from polyclip.augment.fixmatch import Cutout, RandAugment, RandomReflectTranslate, fixmatch_strong, fixmatch_weak
from polyclip.augment.perturbation import SaltPepperNoise, perturbation_pipeline
from polyclip.augment.simclr import SimCLRAugment, blur_kernel_size, simclr_augment, simclr_views

__all__ = [
    "ColorJitter",
    "Cutout",
    "RandAugment",
    "RandomGaussianBlur",
    "RandomReflectTranslate",
    "SaltPepperNoise",
    "SimCLRAugment",
    "blur_kernel_size",
    "fixmatch_strong",
    "fixmatch_weak",
    "perturbation_pipeline",
    "simclr_augment",
    "simclr_views",
]
