"""Gaussian blur with a per-image kernel size and sigma."""

from __future__ import annotations

from collections.abc import Sequence

import kornia
import torch
from torch import nn


class RandomGaussianBlur(nn.Module):
    """Blur each image with probability ``p``, with a kernel size drawn from ``kernel_sizes``.

    Each image independently is blurred with probability ``p``; a blurred image gets a
    square kernel drawn uniformly from ``kernel_sizes`` and a sigma drawn uniformly from
    ``sigma``. A kernel size of 1 is the identity, so ``kernel_sizes=(1, 3)`` (the CES
    paper's choice) leaves about half of the "blurred" images untouched. Borders are
    reflected.

    Args:
        p: Probability that an image is blurred.
        kernel_sizes: Odd kernel sides to choose from (odd, so the image is not shifted).
        sigma: ``(low, high)`` range of the Gaussian's standard deviation, in pixels.

    Shapes:
        ``(B, C, H, W)`` float -> same shape. Kernels wider than the image are not supported
        (reflect padding needs ``kernel_size // 2 < min(H, W)``).

    Example:
        >>> blur = RandomGaussianBlur(p=0.66, kernel_sizes=(1, 3))
        >>> blur(torch.rand(8, 3, 32, 32)).shape
        torch.Size([8, 3, 32, 32])
    """

    def __init__(self, p: float = 0.5, kernel_sizes: Sequence[int] = (3,),
                 sigma: tuple[float, float] = (0.1, 2.0)) -> None:
        super().__init__()
        if not kernel_sizes or any(k < 1 or k % 2 == 0 for k in kernel_sizes):
            raise ValueError(f"kernel_sizes must be odd and positive, got {tuple(kernel_sizes)}")
        if not 0.0 < sigma[0] <= sigma[1]:
            raise ValueError(f"sigma must satisfy 0 < low <= high, got {sigma}")
        self.p = p
        self.kernel_sizes = tuple(int(k) for k in kernel_sizes)
        self.sigma = sigma

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B = x.shape[0]
        # Draw every random number up front, whatever is selected, so the stream consumed
        # from the global RNG depends only on the batch size.
        blurred = torch.rand(B, device=x.device) < self.p
        choice = torch.randint(len(self.kernel_sizes), (B,), device=x.device)
        sigma = torch.empty(B, device=x.device, dtype=x.dtype).uniform_(*self.sigma)
        out = x.clone()
        for i, k in enumerate(self.kernel_sizes):
            if k == 1:
                continue
            idx = (blurred & (choice == i)).nonzero().squeeze(1)
            if idx.numel() == 0:
                continue
            s = sigma[idx].unsqueeze(1).expand(-1, 2)
            out[idx] = kornia.filters.gaussian_blur2d(x[idx], (k, k), s, border_type="reflect")
        return out
