"""NT-Xent, SimCLR's contrastive loss, with negatives gathered from every DDP worker.

Chen, Kornblith, Norouzi and Hinton, "A Simple Framework for Contrastive Learning of
Visual Representations" (ICML 2020), equation (1).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from polyclip.distributed import all_gather, all_reduce, is_distributed, rank


class _GatherWithGrad(torch.autograd.Function):
    """``all_gather`` whose backward is its adjoint: sum the gradients, keep this rank's slice.

    Every rank's loss depends on every rank's embeddings, so the gradient of this rank's
    embeddings is the sum of what all ranks' losses send back to it (a reduce-scatter,
    written as all-reduce + slice because gloo has no reduce-scatter).
    """

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor) -> torch.Tensor:
        ctx.rank, ctx.batch, ctx.device = rank(), x.shape[0], x.device
        return torch.cat(all_gather(x, expected=x.device), dim=0)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> torch.Tensor:
        grad = all_reduce(grad.contiguous(), expected=ctx.device)
        return grad[ctx.rank * ctx.batch : (ctx.rank + 1) * ctx.batch]


def gather_with_grad(x: torch.Tensor) -> torch.Tensor:
    """Concatenate ``x`` from every rank in rank order, keeping gradients to the local part.

    Without an initialised process group (or with one rank) this returns ``x`` itself.
    Every rank must pass the same shape (``ArrayLoader`` pads shards so they do).

    Args:
        x: ``(B, D)`` on this rank.

    Returns:
        ``(world_size * B, D)``; rows ``rank * B : (rank + 1) * B`` are ``x``.

    Note:
        With DDP, which averages parameter gradients over ranks, a loss that every rank
        computes identically on the gathered batch gets exactly the single-process
        gradient: each rank receives ``world_size`` times its share, and the average
        divides it back.
    """
    if not is_distributed():
        return x
    out: torch.Tensor = _GatherWithGrad.apply(x)
    return out


class NTXentLoss(nn.Module):
    """Normalised temperature-scaled cross-entropy (SimCLR's contrastive loss).

    For a batch of ``N`` pairs the ``2N`` embeddings are L2-normalised; each is an anchor
    whose positive is the other view of the same image and whose negatives are the other
    ``2N - 2`` embeddings:

    .. math::
        \\ell_{i,j} = -\\log \\frac{\\exp(\\mathrm{sim}(z_i, z_j)/\\tau)}
                               {\\sum_{k \\ne i} \\exp(\\mathrm{sim}(z_i, z_k)/\\tau)},
        \\qquad L = \\frac{1}{2N} \\sum_{i} \\ell_{i, \\mathrm{pos}(i)}

    With ``gather_negatives=True`` under ``torch.distributed`` the embeddings of every
    rank are gathered first (gradients preserved, see :func:`gather_with_grad`), so each
    rank computes the loss of the global batch, with ``2 N world_size - 2`` negatives
    per anchor, and the value equals the single-process loss on that batch.

    Args:
        temperature: ``tau`` (> 0); SimCLR uses 0.5 on CIFAR-10 and 0.1 on ImageNet.
        gather_negatives: Gather negatives from all ranks when a process group exists.

    Shapes:
        ``z1``, ``z2``: ``(N, D)``, row ``i`` of each being two views of image ``i``.
        Returns a scalar.

    Example:
        >>> loss_fn = NTXentLoss(temperature=0.5)
        >>> z1, z2 = torch.randn(8, 128), torch.randn(8, 128)
        >>> loss = loss_fn(z1, z2)  # ~log(15) for unrelated views
    """

    def __init__(self, temperature: float = 0.5, gather_negatives: bool = True) -> None:
        super().__init__()
        if not temperature > 0:
            raise ValueError(f"temperature must be > 0, got {temperature!r}")
        self.temperature = temperature
        self.gather_negatives = gather_negatives

    def forward(self, z1: torch.Tensor, z2: torch.Tensor) -> torch.Tensor:
        if z1.shape != z2.shape or z1.ndim != 2:
            raise ValueError(f"z1 and z2 must both be (N, D); got {tuple(z1.shape)} and {tuple(z2.shape)}")
        if self.gather_negatives:
            z1, z2 = gather_with_grad(z1), gather_with_grad(z2)
        n = z1.shape[0]
        if n < 2:
            raise ValueError(f"NT-Xent needs at least 2 pairs (the negatives), got {n}")
        z = F.normalize(torch.cat([z1, z2], dim=0), dim=1)
        logits = z @ z.t() / self.temperature
        # An anchor is never its own negative.
        logits = logits.masked_fill(torch.eye(2 * n, dtype=torch.bool, device=z.device), float("-inf"))
        # Built on the embeddings' device: no host-to-device copy per step.
        targets = torch.arange(2 * n, device=z.device).roll(n)
        return F.cross_entropy(logits, targets)
