"""FixMatch weak and strong augmentations on seeded batches."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from polyclip.augment import Cutout, RandomReflectTranslate, fixmatch_strong, fixmatch_weak


def binomial_tol(p: float, n: int, sigmas: float = 5.0) -> float:
    return sigmas * math.sqrt(p * (1 - p) / n)


def find_shift(x: torch.Tensor, out: torch.Tensor, pad: int) -> list[tuple[int, int]]:
    """Every ``(dy, dx)`` with ``out[i, j] == x[i + dy, j + dx]`` wherever both are inside the image."""
    H, W = x.shape[-2:]
    found = []
    for dy in range(-pad, pad + 1):
        for dx in range(-pad, pad + 1):
            o = out[..., max(0, -dy) : H - max(0, dy), max(0, -dx) : W - max(0, dx)]
            s = x[..., max(0, dy) : H + min(0, dy), max(0, dx) : W + min(0, dx)]
            if torch.equal(o, s):
                found.append((dy, dx))
    return found


@pytest.mark.parametrize(("channels", "size", "pad"), [(1, 28, 4), (3, 32, 4), (3, 96, 12)])
def test_translate_is_an_exact_shift_within_range(channels: int, size: int, pad: int) -> None:
    torch.manual_seed(0)
    x = torch.rand(40, channels, size, size)
    shift = RandomReflectTranslate(0.125)
    assert shift.padding(size, size) == (pad, pad)
    out = shift(x)
    assert out.shape == x.shape and out.dtype == x.dtype
    shifts = [find_shift(x[i], out[i], pad) for i in range(len(x))]
    assert all(len(s) == 1 for s in shifts)  # exactly one shift explains each image
    dys = {s[0][0] for s in shifts}
    assert len(dys) > 3 and max(abs(d) for d in dys) <= pad


def test_translate_fills_border_by_reflection() -> None:
    torch.manual_seed(1)
    x = torch.rand(200, 1, 8, 8)
    out = RandomReflectTranslate(0.25)(x)  # 2 px
    padded = F.pad(x, (2, 2, 2, 2), mode="reflect")
    windows = padded.unfold(2, 8, 1).unfold(3, 8, 1)  # (B, 1, 5, 5, 8, 8): every crop
    matches = (windows == out[:, :, None, None]).flatten(4).all(dim=-1)[:, 0]  # (B, 5, 5)
    assert torch.all(matches.flatten(1).sum(dim=1) == 1)
    # The 25 offsets are drawn uniformly: each is hit about 200/25 = 8 times.
    counts = matches.sum(dim=0)
    assert counts.min() >= 1 and counts.max() <= 20


def test_weak_is_flip_plus_shift() -> None:
    torch.manual_seed(2)
    x = torch.rand(400, 3, 16, 16)
    out = fixmatch_weak(flip_p=0.5, max_shift=0.125)(x)
    flipped = 0
    for i in range(len(x)):
        plain = find_shift(x[i], out[i], 2)
        mirrored = find_shift(torch.flip(x[i], dims=[-1]), out[i], 2)
        assert len(plain) + len(mirrored) == 1
        flipped += len(mirrored)
    assert abs(flipped / len(x) - 0.5) < binomial_tol(0.5, len(x))


@pytest.mark.parametrize(("size", "side"), [(32, 16), (28, 14), (224, 112)])
def test_cutout_fills_a_square_of_the_configured_size(size: int, side: int) -> None:
    torch.manual_seed(3)
    x = torch.rand(300 if size < 64 else 20, 3, size, size) * 0.98 + 0.01
    cutout = Cutout(size=0.5, fill=0.0)
    assert cutout.side(size, size) == side
    out = cutout(x)
    mask = out == 0.0
    assert torch.all(mask == mask[:, :1])  # same place in every channel
    assert torch.equal(out[~mask], x[~mask])
    m = mask[:, 0]
    rows, cols = m.any(dim=2), m.any(dim=1)
    # The filled region is a rectangle: the outer product of its rows and columns.
    assert torch.equal(m, rows[:, :, None] & cols[:, None, :])
    full = 0
    for r in (rows, cols):
        idx = torch.arange(size)
        first = torch.where(r, idx, size).min(dim=1).values
        last = torch.where(r, idx, -1).max(dim=1).values
        length = r.sum(dim=1)
        assert torch.all(length == last - first + 1)  # contiguous
        assert torch.all(length <= side)
        # Shorter than the side only when clipped by a border.
        clipped = (first == 0) | (last == size - 1)
        assert torch.all((length == side) | clipped)
        full += int((length == side).sum())
    assert full > 0.5 * len(x)


def test_cutout_probability_and_fill() -> None:
    torch.manual_seed(4)
    x = torch.rand(2000, 1, 8, 8) * 0.4
    out = Cutout(size=0.5, fill=0.5, p=0.3)(x)
    touched = (out == 0.5).flatten(1).any(dim=1).float().mean().item()
    assert abs(touched - 0.3) < binomial_tol(0.3, len(x))


def has_filled_block(out: torch.Tensor, fill: float, side: int) -> torch.Tensor:
    """Per image: is there a ``side x side`` window, allowing for border clipping, all equal to ``fill``?"""
    outside = (out != fill).any(dim=1).double()
    half = side // 2
    outside = F.pad(outside, (half, half, half, half), value=0.0)  # beyond the border counts as filled
    # Window sums from an integral image: a window with no unfilled pixel sums to 0.
    integral = F.pad(outside.cumsum(1).cumsum(2), (1, 0, 1, 0))
    sums = (integral[:, side:, side:] - integral[:, :-side, side:]
            - integral[:, side:, :-side] + integral[:, :-side, :-side])
    return (sums == 0).flatten(1).any(dim=1)


@pytest.mark.parametrize(("channels", "size"), [(1, 28), (3, 32), (3, 96)])
def test_strong_changes_images_and_cuts_a_square(channels: int, size: int) -> None:
    x = torch.rand(16 if size < 64 else 2, channels, size, size)
    strong = fixmatch_strong(randaugment_n=2, cutout=0.5, cutout_fill=0.5)
    torch.manual_seed(8)
    a = strong(x)
    torch.manual_seed(8)
    b = strong(x)
    assert a.shape == x.shape and a.dtype == x.dtype
    assert a.min() >= 0.0 and a.max() <= 1.0
    assert torch.equal(a, b)
    assert not torch.equal(a, strong(x))
    assert changed_share(x, a) == 1.0
    # Cutout's side is drawn up to half the image: never more grey pixels than that square.
    assert ((a == 0.5).all(dim=1).flatten(1).sum(dim=1) <= (size // 2) ** 2).all()


def test_weak_keeps_values_and_is_deterministic() -> None:
    x = torch.rand(16, 3, 32, 32)
    weak = fixmatch_weak()
    torch.manual_seed(9)
    a = weak(x)
    torch.manual_seed(9)
    assert torch.equal(a, weak(x))
    # Flips and whole-pixel shifts only move values: every output value is an input value.
    assert torch.isin(a, x).all()


def changed_share(x: torch.Tensor, y: torch.Tensor) -> float:
    return (x != y).flatten(1).any(dim=1).float().mean().item()
