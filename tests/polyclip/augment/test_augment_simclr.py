"""SimCLR two-view augmentation on seeded batches."""

from __future__ import annotations

import math

import pytest
import torch

from polyclip.augment import RandomGaussianBlur, SimCLRAugment, blur_kernel_size, simclr_augment, simclr_views


def binomial_tol(p: float, n: int, sigmas: float = 5.0) -> float:
    return sigmas * math.sqrt(p * (1 - p) / n)


def test_blur_kernel_is_odd_and_about_a_tenth_of_the_side() -> None:
    assert blur_kernel_size(224) == 23  # SimCLR's ImageNet kernel
    assert blur_kernel_size(96) == 9
    assert blur_kernel_size(32) == 3
    assert blur_kernel_size(28) == 3
    assert simclr_augment(224).blur_kernel_size == 23


@pytest.mark.parametrize(("preset", "channels", "size"),
                         [("small", 1, 28), ("small", 3, 32), ("imagenet", 3, 32), ("imagenet", 1, 96)])
def test_views_differ_and_keep_shape_and_range(preset: str, channels: int, size: int) -> None:
    torch.manual_seed(0)
    x = torch.rand(16 if size < 64 else 4, channels, size, size)
    view1, view2 = simclr_views(x, simclr_augment(size, preset=preset))  # type: ignore[arg-type]
    for view in (view1, view2):
        assert view.shape == x.shape and view.dtype == x.dtype
        assert view.min() >= 0.0 and view.max() <= 1.0
        assert (view - x).flatten(1).abs().amax(dim=1).gt(1e-3).all()
    assert (view1 - view2).flatten(1).abs().amax(dim=1).gt(1e-3).all()


def test_views_are_reproducible_under_manual_seed() -> None:
    x = torch.rand(8, 3, 32, 32)
    augment = simclr_augment(32, preset="imagenet")
    torch.manual_seed(1)
    a1, a2 = simclr_views(x, augment)
    torch.manual_seed(1)
    b1, b2 = simclr_views(x, augment)
    assert torch.equal(a1, b1) and torch.equal(a2, b2)


def test_resizes_to_image_size() -> None:
    torch.manual_seed(2)
    out = SimCLRAugment(image_size=32)(torch.rand(4, 3, 64, 64))
    assert out.shape == (4, 3, 32, 32)


def test_full_crop_without_colour_is_identity_or_flip() -> None:
    torch.manual_seed(3)
    x = torch.rand(400, 3, 8, 8)
    augment = SimCLRAugment(8, scale=(1.0, 1.0), ratio=(1.0, 1.0), jitter_p=0.0, grayscale_p=0.0, blur_p=0.0)
    out = augment(x)
    same = torch.isclose(out, x, atol=1e-5).flatten(1).all(dim=1)
    flipped = torch.isclose(out, torch.flip(x, dims=[-1]), atol=1e-5).flatten(1).all(dim=1)
    assert torch.all(same ^ flipped)
    assert abs(flipped.float().mean().item() - 0.5) < binomial_tol(0.5, len(x))


def test_small_crops_zoom_in() -> None:
    # A crop of at most 20% of the area, resized back, varies more slowly across the image.
    torch.manual_seed(4)
    x = torch.rand(32, 3, 32, 32)
    augment = SimCLRAugment(32, scale=(0.1, 0.2), jitter_p=0.0, grayscale_p=0.0, blur_p=0.0)
    out = augment(x)
    assert out.diff(dim=-1).abs().mean() < 0.6 * x.diff(dim=-1).abs().mean()


def identity_crop(**kwargs: float) -> SimCLRAugment:
    return SimCLRAugment(16, scale=(1.0, 1.0), ratio=(1.0, 1.0), flip_p=0.0, **kwargs)  # type: ignore[arg-type]


def test_grayscale_rate() -> None:
    torch.manual_seed(5)
    x = torch.rand(1000, 3, 16, 16)
    out = identity_crop(jitter_p=0.0, grayscale_p=0.2, blur_p=0.0)(x)
    gray = (out == out[:, :1]).flatten(1).all(dim=1)
    assert abs(gray.float().mean().item() - 0.2) < binomial_tol(0.2, len(x))


def test_jitter_rate_and_strength() -> None:
    torch.manual_seed(6)
    x = torch.rand(1000, 3, 16, 16)
    out = identity_crop(jitter_p=0.8, grayscale_p=0.0, blur_p=0.0)(x)
    jittered = (out - x).flatten(1).abs().amax(dim=1) > 1e-4
    assert abs(jittered.float().mean().item() - 0.8) < binomial_tol(0.8, len(x))
    # Strength s scales the distortion: s = 0.25 moves pixels much less than s = 1.
    torch.manual_seed(6)
    mild = identity_crop(jitter_strength=0.25, jitter_p=1.0, grayscale_p=0.0, blur_p=0.0)(x)
    torch.manual_seed(6)
    strong = identity_crop(jitter_strength=1.0, jitter_p=1.0, grayscale_p=0.0, blur_p=0.0)(x)
    assert (mild - x).abs().mean() < 0.5 * (strong - x).abs().mean()


def test_blur_rate_and_small_preset_has_none() -> None:
    torch.manual_seed(7)
    x = torch.rand(1000, 1, 16, 16)
    out = identity_crop(jitter_p=0.0, grayscale_p=0.0, blur_p=0.5)(x)
    blurred = (out - x).flatten(1).abs().amax(dim=1) > 1e-4
    assert abs(blurred.float().mean().item() - 0.5) < binomial_tol(0.5, len(x))
    blurs = [m for m in simclr_augment(32, preset="small").modules() if isinstance(m, RandomGaussianBlur)]
    assert [b.p for b in blurs] == [0.0]


def test_unknown_preset_names_the_valid_ones() -> None:
    with pytest.raises(ValueError, match="imagenet"):
        simclr_augment(32, preset="cifar")  # type: ignore[arg-type]
