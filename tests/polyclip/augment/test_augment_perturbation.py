"""Statistics of the CES perturbations on seeded batches."""

from __future__ import annotations

import math

import kornia
import pytest
import torch

from polyclip.augment import ColorJitter, RandomGaussianBlur, SaltPepperNoise, perturbation_pipeline


def binomial_tol(p: float, n: int, sigmas: float = 5.0) -> float:
    """``sigmas`` standard deviations of a share of ``n`` Bernoulli(p) draws."""
    return sigmas * math.sqrt(p * (1 - p) / n)


def changed_images(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return (x != y).flatten(1).any(dim=1)


@pytest.fixture()
def batch() -> torch.Tensor:
    torch.manual_seed(0)
    # Values strictly inside (0, 1), so writing 0 or 1 always changes a value.
    return torch.rand(2000, 3, 8, 8) * 0.98 + 0.01


def test_salt_pepper_touches_share_p_of_images(batch: torch.Tensor) -> None:
    torch.manual_seed(1)
    out = SaltPepperNoise(p=0.1, amount=0.2)(batch)
    share = changed_images(batch, out).float().mean().item()
    assert abs(share - 0.1) < binomial_tol(0.1, len(batch))


def test_salt_pepper_amount_and_values(batch: torch.Tensor) -> None:
    torch.manual_seed(2)
    amount = 0.2
    out = SaltPepperNoise(p=1.0, amount=amount, salt_ratio=0.3)(batch)
    changed = out != batch
    n = changed.numel()
    assert abs(changed.float().mean().item() - amount) < binomial_tol(amount, n)
    written = out[changed]
    assert torch.all((written == 0) | (written == 1))
    n_written = written.numel()
    assert abs((written == 1).float().mean().item() - 0.3) < binomial_tol(0.3, n_written)
    # Untouched values are the input's, bit for bit.
    assert torch.equal(out[~changed], batch[~changed])


def test_salt_pepper_is_per_channel_not_black_and_white(batch: torch.Tensor) -> None:
    torch.manual_seed(3)
    amount = 0.2
    out = SaltPepperNoise(p=1.0, amount=amount)(batch)
    hit = out != batch  # (B, 3, H, W)
    any_hit = hit.any(dim=1)
    all_hit = hit.all(dim=1)
    # Independent channels: P(all three hit) = amount^3; black/white noise would make it amount.
    assert abs(all_hit.float().mean().item() - amount**3) < binomial_tol(amount**3, all_hit.numel())
    assert abs(any_hit.float().mean().item() - (1 - (1 - amount) ** 3)) < binomial_tol(0.488, any_hit.numel())
    # Where all channels are hit, they disagree (a coloured speck) about 3/4 of the time.
    specks = out.permute(0, 2, 3, 1)[all_hit]
    coloured = (specks != specks[:, :1]).any(dim=1).float().mean().item()
    assert abs(coloured - 0.75) < binomial_tol(0.75, len(specks))


def test_salt_pepper_one_channel_and_p_zero() -> None:
    torch.manual_seed(4)
    x = torch.rand(16, 1, 28, 28)
    assert torch.equal(SaltPepperNoise(p=0.0, amount=0.5)(x), x)
    out = SaltPepperNoise(p=1.0, amount=0.5)(x)
    assert out.shape == x.shape and changed_images(x, out).all()


@pytest.mark.parametrize(("kernel_sizes", "expected"), [((3,), 0.66), ((1, 3), 0.33)])
def test_blur_rate(kernel_sizes: tuple[int, ...], expected: float) -> None:
    torch.manual_seed(5)
    x = torch.rand(2000, 1, 6, 6)
    out = RandomGaussianBlur(p=0.66, kernel_sizes=kernel_sizes)(x)
    share = changed_images(x, out).float().mean().item()
    assert abs(share - expected) < binomial_tol(expected, len(x))


def test_blur_kernel_one_is_identity() -> None:
    torch.manual_seed(6)
    x = torch.rand(32, 3, 16, 16)
    assert torch.equal(RandomGaussianBlur(p=1.0, kernel_sizes=(1,))(x), x)


def test_blur_smooths_and_matches_kornia_with_fixed_sigma() -> None:
    torch.manual_seed(7)
    x = torch.rand(64, 3, 16, 16)
    out = RandomGaussianBlur(p=1.0, kernel_sizes=(3,), sigma=(1.0, 1.0))(x)
    expected = kornia.filters.gaussian_blur2d(x, (3, 3), (1.0, 1.0), border_type="reflect")
    torch.testing.assert_close(out, expected)
    # Neighbouring pixels become more alike.
    assert out.diff(dim=-1).abs().mean() < 0.7 * x.diff(dim=-1).abs().mean()


def test_blur_rejects_even_kernels() -> None:
    with pytest.raises(ValueError, match="odd"):
        RandomGaussianBlur(kernel_sizes=(2,))


def test_flip_rate_and_exact_flips() -> None:
    torch.manual_seed(8)
    x = torch.rand(2000, 3, 4, 4)
    augment = perturbation_pipeline(noise_p=0.0, blur_p=0.0, jitter_p=0.0, flip_p=0.5)
    out = augment(x)
    same = (out == x).flatten(1).all(dim=1)
    flipped = (out == torch.flip(x, dims=[-1])).flatten(1).all(dim=1)
    assert torch.all(same ^ flipped)
    assert abs(flipped.float().mean().item() - 0.5) < binomial_tol(0.5, len(x))


def test_color_jitter_rgb_and_gray() -> None:
    torch.manual_seed(9)
    jitter = ColorJitter(brightness=0.4, contrast=0.4, saturation=0.4, hue=0.1, p=1.0)
    for channels in (1, 3):
        x = torch.rand(32, channels, 16, 16)
        out = jitter(x)
        assert out.shape == x.shape and out.dtype == x.dtype
        assert out.min() >= 0.0 and out.max() <= 1.0
        assert changed_images(x, out).float().mean() > 0.9


def test_color_jitter_brightness_moves_means() -> None:
    torch.manual_seed(10)
    x = torch.full((500, 3, 4, 4), 0.5)
    out = ColorJitter(brightness=0.4, p=1.0)(x)
    means = out.mean(dim=(1, 2, 3))
    # Brightness factor ~ U(0.6, 1.4) times 0.5: means spread over (0.3, 0.7).
    assert 0.28 < means.min() < 0.35 and 0.65 < means.max() < 0.72
    assert torch.equal(ColorJitter(brightness=0.4, p=0.0)(x), x)


@pytest.mark.parametrize(("channels", "size"), [(1, 28), (3, 32), (3, 224)])
def test_pipeline_shapes_range_and_determinism(channels: int, size: int) -> None:
    x = torch.rand(4 if size > 64 else 64, channels, size, size)
    augment = perturbation_pipeline(noise_p=0.5)
    torch.manual_seed(11)
    a = augment(x)
    torch.manual_seed(11)
    b = augment(x)
    c = augment(x)
    assert a.shape == x.shape and a.dtype == x.dtype
    assert a.min() >= 0.0 and a.max() <= 1.0
    assert torch.equal(a, b)
    assert not torch.equal(a, c)
    assert not torch.equal(a, x)
