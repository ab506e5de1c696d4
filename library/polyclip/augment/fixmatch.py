"""Weak and strong augmentations for FixMatch-style consistency training.

FixMatch (Sohn et al., 2020) predicts a pseudo-label on a *weakly* augmented image (flip
and a small translation) and trains on a *strongly* augmented view of the same image
(RandAugment followed by Cutout). Both act on [0, 1] batches on the training device;
normalisation comes afterwards, in the backbone.
"""

from __future__ import annotations

from typing import Any

import kornia.augmentation as K
import torch
import torch.nn.functional as F
from kornia.augmentation.auto import RandAugment as KorniaRandAugment
from kornia.augmentation.auto.rand_augment.rand_augment import default_policy
from torch import nn


class RandomReflectTranslate(nn.Module):
    """Translate each image by a random whole number of pixels, filling with reflections.

    FixMatch's weak translation: reflect-pad by ``max_shift`` of each side, then take a
    random crop of the original size. The content is exactly the input shifted by
    ``(dy, dx)`` with ``|dy| <= round(max_shift * H)`` and ``|dx| <= round(max_shift * W)``,
    drawn uniformly per image; no resampling.

    Args:
        max_shift: Largest shift as a fraction of the side (FixMatch: 0.125, 4 px at 32 px).

    Shapes:
        ``(B, C, H, W)`` -> same shape. The padding must be smaller than the side, so
        ``max_shift < 1``.

    Example:
        >>> shift = RandomReflectTranslate(0.125)
        >>> shift(torch.rand(8, 3, 32, 32)).shape
        torch.Size([8, 3, 32, 32])
    """

    def __init__(self, max_shift: float = 0.125) -> None:
        super().__init__()
        if not 0.0 <= max_shift < 1.0:
            raise ValueError(f"max_shift must be in [0, 1), got {max_shift}")
        self.max_shift = max_shift

    def padding(self, height: int, width: int) -> tuple[int, int]:
        """The reflect padding ``(pad_h, pad_w)``, i.e. the largest shift, in pixels."""
        return round(self.max_shift * height), round(self.max_shift * width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, C, H, W = x.shape
        ph, pw = self.padding(H, W)
        if ph == 0 and pw == 0:
            return x
        padded = F.pad(x, (pw, pw, ph, ph), mode="reflect")
        top = torch.randint(2 * ph + 1, (B,), device=x.device)
        left = torch.randint(2 * pw + 1, (B,), device=x.device)
        rows = top[:, None] + torch.arange(H, device=x.device)
        cols = left[:, None] + torch.arange(W, device=x.device)
        out = padded.gather(2, rows[:, None, :, None].expand(B, C, H, W + 2 * pw))
        return out.gather(3, cols[:, None, None, :].expand(B, C, H, W))


class Cutout(nn.Module):
    """Fill a random square of each image with a constant (DeVries & Taylor, 2017).

    The square's side is ``round(size * min(H, W))`` pixels; its centre is uniform over the
    image, so near a border the square is clipped, as in the original Cutout and in
    FixMatch's ``CutoutAbs``.

    Args:
        size: Side of the square as a fraction of the image side (FixMatch: 0.5).
        fill: Value written into the square (0.5, the grey FixMatch uses; 0 for black).
        p: Probability that an image is cut out.

    Shapes:
        ``(B, C, H, W)`` -> same shape; all channels are cut at the same place.

    Example:
        >>> cutout = Cutout(size=0.5)
        >>> cutout(torch.rand(8, 3, 32, 32)).shape
        torch.Size([8, 3, 32, 32])
    """

    def __init__(self, size: float = 0.5, fill: float = 0.5, p: float = 1.0) -> None:
        super().__init__()
        if not 0.0 <= size <= 1.0:
            raise ValueError(f"size must be in [0, 1], got {size}")
        self.size = size
        self.fill = fill
        self.p = p

    def side(self, height: int, width: int) -> int:
        """The square's side in pixels for an image of ``height x width``."""
        return round(self.size * min(height, width))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, _, H, W = x.shape
        s = self.side(H, W)
        applied = torch.rand(B, device=x.device) < self.p
        cy = torch.randint(H, (B,), device=x.device)
        cx = torch.randint(W, (B,), device=x.device)
        y0, x0 = cy - s // 2, cx - s // 2
        ys = torch.arange(H, device=x.device)[None, :]
        xs = torch.arange(W, device=x.device)[None, :]
        in_rows = (ys >= y0[:, None]) & (ys < (y0 + s)[:, None])
        in_cols = (xs >= x0[:, None]) & (xs < (x0 + s)[:, None])
        mask = in_rows[:, :, None] & in_cols[:, None, :] & applied[:, None, None]
        return x.masked_fill(mask[:, None], self.fill)


class RandAugment(nn.Module):
    """RandAugment (Cubuk et al., 2020) with the operations drawn per image.

    kornia's :class:`~kornia.augmentation.auto.RandAugment` draws its ``n`` operations once
    per call, so a whole batch would share them. Here each image draws its own ``n``
    distinct operations from ``policy`` (uniformly, without replacement) and each
    operation runs, through a one-operation kornia ``RandAugment``, on the images that drew
    it, so magnitudes follow kornia's mapping: every selected operation gets
    ``low + (high - low) * m / 30`` with a random sign for the symmetric ones.

    kornia's ``color`` (saturation) operation rejects one channel, so a 1-channel batch is
    repeated to three channels, augmented and averaged back. All operations treat the
    channels alike, so the three stay equal and the average loses nothing (saturation of a
    grey image is the identity).

    Args:
        n: Operations per image.
        m: Magnitude, in (0, 30) exclusive.
        policy: kornia sub-policies, one operation each, e.g. ``[[("rotate", -30.0, 30.0)], ...]``;
            kornia's default 15-operation list when None.

    Shapes:
        ``(B, C, H, W)`` float in [0, 1] with ``C`` in {1, 3} -> same shape, in [0, 1].

    Example:
        >>> augment = RandAugment(n=2, m=10)
        >>> augment(torch.rand(8, 1, 28, 28)).shape
        torch.Size([8, 1, 28, 28])
    """

    def __init__(self, n: int = 2, m: int = 10, policy: list[list[tuple[str, Any, Any]]] | None = None) -> None:
        super().__init__()
        policy = default_policy if policy is None else policy
        if not 1 <= n <= len(policy):
            raise ValueError(f"n must be in [1, {len(policy)}] (the number of operations), got {n}")
        self.n = n
        self.m = m
        self.ops = nn.ModuleList(KorniaRandAugment(n=1, m=m, policy=[sub], transformation_matrix_mode="skip")
                                 for sub in policy)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gray = x.shape[1] == 1
        out = x.expand(-1, 3, -1, -1) if gray else x
        # A random permutation per image; its first n entries are that image's operations.
        choice = torch.rand(x.shape[0], len(self.ops), device=x.device).argsort(dim=1)[:, : self.n]
        for step in range(self.n):
            out = out.clone()
            for k, op in enumerate(self.ops):
                idx = (choice[:, step] == k).nonzero().squeeze(1)
                if idx.numel() > 0:
                    out[idx] = op(out[idx])
        out = out.clamp(0.0, 1.0)
        return out.mean(dim=1, keepdim=True) if gray else out


def fixmatch_weak(flip_p: float = 0.5, max_shift: float = 0.125) -> nn.Sequential:
    """FixMatch's weak augmentation: horizontal flip, then a reflect-padded random translation.

    Args:
        flip_p: Probability of a horizontal flip.
        max_shift: Largest translation as a fraction of the side.

    Returns:
        ``nn.Sequential`` mapping ``(B, C, H, W)`` float in [0, 1] to the same shape
        (not normalised: apply ``backbone.normalize`` after it).

    Example:
        >>> weak = fixmatch_weak()
        >>> weak(torch.rand(4, 3, 32, 32)).shape
        torch.Size([4, 3, 32, 32])
    """
    return nn.Sequential(K.RandomHorizontalFlip(p=flip_p), RandomReflectTranslate(max_shift))


def fixmatch_strong(
    n: int = 2,
    m: int = 10,
    cutout_size: float = 0.5,
    cutout_fill: float = 0.5,
    flip_p: float = 0.5,
    max_shift: float = 0.125,
) -> nn.Sequential:
    """FixMatch's strong augmentation: flip and translate, RandAugment, then Cutout.

    The reference implementations apply the weak flip and translation before RandAugment
    in the strong branch as well; pass ``flip_p=0, max_shift=0`` for RandAugment and
    Cutout alone. FixMatch's own RandAugment variant draws a random magnitude per
    operation; kornia's uses the fixed ``m`` (``m=10`` is the common FixMatch setting).

    Args:
        n: RandAugment operations per image.
        m: RandAugment magnitude, in (0, 30) exclusive.
        cutout_size: Side of the Cutout square as a fraction of the image side.
        cutout_fill: Value written into the Cutout square.
        flip_p: Probability of a horizontal flip before RandAugment.
        max_shift: Largest translation before RandAugment, as a fraction of the side.

    Returns:
        ``nn.Sequential`` mapping ``(B, C, H, W)`` float in [0, 1] with ``C`` in {1, 3} to
        the same shape (not normalised: apply ``backbone.normalize`` after it).

    Example:
        >>> strong = fixmatch_strong(m=10)
        >>> strong(torch.rand(4, 3, 32, 32)).shape
        torch.Size([4, 3, 32, 32])
    """
    return nn.Sequential(
        K.RandomHorizontalFlip(p=flip_p),
        RandomReflectTranslate(max_shift),
        RandAugment(n=n, m=m),
        Cutout(size=cutout_size, fill=cutout_fill),
    )
