"""Optimisers (SGD, Adam, AdamW, LARS) and per-step learning-rate schedules."""

from __future__ import annotations

import functools
import math
from collections.abc import Iterable

import torch
from torch import nn
from torch.optim.lr_scheduler import LambdaLR, LRScheduler

# Layers whose every parameter (scale and shift) is exempt from weight decay.
_NORM_LAYERS = (nn.modules.batchnorm._BatchNorm, nn.LayerNorm, nn.GroupNorm, nn.modules.instancenorm._InstanceNorm,
                nn.LocalResponseNorm)


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


def _is_no_decay(module: nn.Module, param: nn.Parameter) -> bool:
    """Biases and normalisation parameters take no weight decay (the references' convention)."""
    return param.ndim <= 1 or isinstance(module, _NORM_LAYERS)


def parameter_groups(module: nn.Module, weight_decay: float) -> list[dict]:
    """Split a module's trainable parameters into a decayed and a non-decayed group.

    Weights of convolutions and linear layers are decayed; biases, every other 1-d
    parameter and all parameters of BatchNorm / LayerNorm / GroupNorm / InstanceNorm
    layers are not, as in the FixMatch, SimCLR and timm reference implementations.
    A parameter shared by several modules is listed once, under its first owner.

    Args:
        module: The model whose parameters to group.
        weight_decay: The decay of the first group.

    Returns:
        ``[{"params": decayed, "weight_decay": weight_decay}, {"params": others, "weight_decay": 0.0}]``,
        leaving out an empty group.
    """
    decay: list[nn.Parameter] = []
    no_decay: list[nn.Parameter] = []
    seen: set[int] = set()
    for sub in module.modules():
        for param in sub.parameters(recurse=False):
            if not param.requires_grad or id(param) in seen:
                continue
            seen.add(id(param))
            (no_decay if _is_no_decay(sub, param) else decay).append(param)
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return [g for g in groups if g["params"]]


def build_optimizer(params: nn.Module | Iterable[nn.Parameter], name: str, lr: float, weight_decay: float = 0.0,
                    momentum: float = 0.9, nesterov: bool = False) -> torch.optim.Optimizer:
    """Build an optimiser by name: ``sgd``, ``adam``, ``adamw`` or ``lars``.

    Args:
        params: A module, whose biases and normalisation parameters are then excluded
            from weight decay (see :func:`parameter_groups`), or an iterable of
            parameters, which all take ``weight_decay``. Frozen parameters are skipped.
        name: ``sgd``, ``adam``, ``adamw`` or ``lars``.
        lr: Base learning rate.
        weight_decay: L2 penalty (decoupled for ``adamw``).
        momentum: Momentum of ``sgd`` and ``lars``.
        nesterov: Nesterov momentum for ``sgd``.

    Returns:
        The optimiser.

    Raises:
        ValueError: An unknown name, a negative rate or decay, or no trainable parameters.
    """
    if lr < 0:
        raise ValueError(f"learning rate must be >= 0, got {lr}")
    if weight_decay < 0:
        raise ValueError(f"weight_decay must be >= 0, got {weight_decay}")
    if isinstance(params, nn.Module):
        groups: list[dict] = parameter_groups(params, weight_decay)
    else:
        trainable = [p for p in params if p.requires_grad]
        groups = [{"params": trainable, "weight_decay": weight_decay}] if trainable else []
    if not groups:
        raise ValueError("the task has no trainable parameters")
    if name == "sgd":
        return torch.optim.SGD(groups, lr=lr, momentum=momentum, nesterov=nesterov, weight_decay=weight_decay)
    if name == "adam":
        return torch.optim.Adam(groups, lr=lr, weight_decay=weight_decay)
    if name == "adamw":
        return torch.optim.AdamW(groups, lr=lr, weight_decay=weight_decay)
    if name == "lars":
        return LARS(groups, lr=lr, momentum=momentum, weight_decay=weight_decay)
    raise ValueError(f"unknown optimizer {name!r}; valid: sgd, adam, adamw, lars")


SCHEDULERS = ("cosine", "fixmatch_cosine", "constant", "plateau")


def lr_factor(name: str, step: int, total_steps: int, warmup_steps: int = 0) -> float:
    """The multiple of the base rate used after ``step`` optimiser steps.

    * ``cosine``: linear warm-up, then a half cosine ``(1 + cos(pi t)) / 2`` over the
      remaining steps, reaching exactly 0 after ``total_steps`` (SGDR, Loshchilov & Hutter
      2017, as used by SimCLR, fine-tuning and distillation).
    * ``fixmatch_cosine``: linear warm-up, then ``cos(7 pi t / 16)``, which ends at
      0.195 (FixMatch, Sohn et al. 2020, section 3.2 / appendix).
    * ``constant``: linear warm-up, then 1.

    ``t = (step - warmup_steps) / (total_steps - warmup_steps)`` is clamped to [0, 1].

    Args:
        name: ``cosine``, ``fixmatch_cosine`` or ``constant``.
        step: Optimiser steps taken so far (the scheduler's ``last_epoch``).
        total_steps: Steps of the whole schedule.
        warmup_steps: Steps of linear warm-up from ``1 / warmup_steps`` to 1.

    Returns:
        The factor in [0, 1].
    """
    if warmup_steps and step < warmup_steps:
        return (step + 1) / warmup_steps
    if name == "constant":
        return 1.0
    progress = min(max((step - warmup_steps) / max(1, total_steps - warmup_steps), 0.0), 1.0)
    if name == "cosine":
        return 0.5 * (1.0 + math.cos(math.pi * progress))
    if name == "fixmatch_cosine":
        return math.cos(7 * math.pi * progress / 16)
    raise ValueError(f"unknown scheduler {name!r}; valid: {', '.join(SCHEDULERS)}")


def build_scheduler(optimizer: torch.optim.Optimizer, name: str, total_steps: int,
                    warmup_steps: int = 0) -> LRScheduler | None:
    """A per-step schedule (see :func:`lr_factor`), or ``None`` for ``plateau``.

    ``plateau`` (``ReduceLROnPlateau`` on validation loss) steps per epoch, so the loop
    builds it itself. Call ``scheduler.step()`` after every optimiser step; after
    ``total_steps`` calls ``cosine`` is at 0 and ``fixmatch_cosine`` at 0.195 of the
    base rate. Every parameter group keeps its own base rate (``initial_lr``).

    Args:
        optimizer: The optimiser whose groups to schedule.
        name: ``cosine``, ``fixmatch_cosine``, ``constant`` or ``plateau``.
        total_steps: Optimiser steps of the whole run.
        warmup_steps: Steps of linear warm-up.

    Returns:
        A ``LambdaLR``, or ``None`` for ``plateau``.

    Raises:
        ValueError: An unknown name, ``total_steps < 1`` or a warm-up outside [0, total_steps].
    """
    if name not in SCHEDULERS:
        raise ValueError(f"unknown scheduler {name!r}; valid: {', '.join(SCHEDULERS)}")
    if name == "plateau":
        return None
    if total_steps < 1:
        raise ValueError(f"total_steps must be >= 1, got {total_steps}")
    if not 0 <= warmup_steps <= total_steps:
        raise ValueError(f"warmup_steps must be in [0, total_steps={total_steps}], got {warmup_steps}")
    return LambdaLR(optimizer, functools.partial(lr_factor, name, total_steps=total_steps, warmup_steps=warmup_steps))
