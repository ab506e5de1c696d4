"""Optimisers (SGD, Adam, AdamW, LARS) and per-step learning-rate schedules."""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch
from torch import nn
from torch.optim.lr_scheduler import LambdaLR, LRScheduler


class LARS(torch.optim.Optimizer):
    """Layer-wise Adaptive Rate Scaling (You et al. 2017), as used by SimCLR.

    Each parameter's step is scaled by ``trust * ||w|| / (||g|| + wd * ||w||)``; biases
    and normalisation parameters (1-d tensors) are excluded from adaptation and decay.

    Args:
        params: Parameters or groups.
        lr: Base learning rate.
        momentum: Heavy-ball momentum.
        weight_decay: L2 penalty on adapted parameters.
        trust_coefficient: ``eta`` in the paper.
    """

    def __init__(self, params: Iterable[nn.Parameter] | Iterable[dict], lr: float, momentum: float = 0.9,
                 weight_decay: float = 1e-6, trust_coefficient: float = 0.001) -> None:
        super().__init__(params, dict(lr=lr, momentum=momentum, weight_decay=weight_decay,
                                      trust_coefficient=trust_coefficient))

    @torch.no_grad()
    def step(self, closure=None):  # type: ignore[no-untyped-def,override]
        loss = closure() if closure is not None else None
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                grad = p.grad
                if p.ndim > 1:
                    grad = grad.add(p, alpha=group["weight_decay"])
                    w_norm, g_norm = torch.norm(p), torch.norm(grad)
                    trust = torch.where((w_norm > 0) & (g_norm > 0),
                                        group["trust_coefficient"] * w_norm / g_norm, torch.ones_like(w_norm))
                    grad = grad.mul(trust)
                state = self.state[p]
                buf = state.get("momentum_buffer")
                if buf is None:
                    buf = state["momentum_buffer"] = torch.clone(grad).detach()
                else:
                    buf.mul_(group["momentum"]).add_(grad)
                p.add_(buf, alpha=-group["lr"])
        return loss


def build_optimizer(params: Iterable[nn.Parameter], name: str, lr: float, weight_decay: float = 0.0,
                    momentum: float = 0.9, nesterov: bool = False) -> torch.optim.Optimizer:
    """Build an optimiser by name: ``sgd``, ``adam``, ``adamw`` or ``lars``."""
    trainable = [p for p in params if p.requires_grad]
    if not trainable:
        raise ValueError("the task has no trainable parameters")
    if name == "sgd":
        return torch.optim.SGD(trainable, lr=lr, momentum=momentum, nesterov=nesterov, weight_decay=weight_decay)
    if name == "adam":
        return torch.optim.Adam(trainable, lr=lr, weight_decay=weight_decay)
    if name == "adamw":
        return torch.optim.AdamW(trainable, lr=lr, weight_decay=weight_decay)
    if name == "lars":
        return LARS(trainable, lr=lr, momentum=momentum, weight_decay=weight_decay)
    raise ValueError(f"unknown optimizer {name!r}; valid: sgd, adam, adamw, lars")


def build_scheduler(optimizer: torch.optim.Optimizer, name: str, total_steps: int,
                    warmup_steps: int = 0) -> LRScheduler | None:
    """A per-step schedule: ``cosine`` (with linear warm-up), ``constant``, or ``None`` for ``plateau``.

    ``plateau`` (``ReduceLROnPlateau`` on validation loss) steps per epoch, so the loop
    builds it itself; this returns ``None`` for it.
    """
    if name == "plateau":
        return None
    if name not in {"cosine", "constant"}:
        raise ValueError(f"unknown scheduler {name!r}; valid: cosine, constant, plateau")

    def factor(step: int) -> float:
        if warmup_steps and step < warmup_steps:
            return (step + 1) / warmup_steps
        if name == "constant":
            return 1.0
        progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        # FixMatch's cosine: cos(7 pi k / 16 K) keeps the rate from reaching zero.
        return max(0.0, math.cos(7 * math.pi * min(progress, 1.0) / 16))

    return LambdaLR(optimizer, factor)
