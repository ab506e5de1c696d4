"""An exponential moving average (EMA) of a model's weights, for evaluation.

FixMatch (Sohn et al., 2020) evaluates an EMA of the trained weights (decay 0.999):
``theta_ema <- decay * theta_ema + (1 - decay) * theta`` after every optimiser step.
"""

from __future__ import annotations

import copy

import torch
from torch import nn


class ModelEma(nn.Module):
    """A frozen copy of ``model`` that tracks its weights by an exponential moving average.

    Floating-point parameters and buffers (e.g. BatchNorm running statistics) follow
    ``ema <- decay * ema + (1 - decay) * current``; integer buffers (``num_batches_tracked``)
    are copied. The copy's parameters do not require gradients, so optimisers and DDP skip
    them, and it is a registered sub-module, so it lives in the owner's ``state_dict`` and
    is checkpointed and resumed with it.

    Args:
        model: The model to track (copied once here).
        decay: EMA decay in [0, 1); FixMatch uses 0.999.
        warmup: Use ``min(decay, (1 + n) / (10 + n))`` at update ``n`` (as TensorFlow's and
            timm's EMAs do), so short runs are not evaluated on weights that are mostly the
            random initialisation: with decay 0.999, 300 steps leave 74% of the initial weights.

    Example:
        >>> net = nn.Linear(4, 2)
        >>> ema = ModelEma(net, decay=0.9)
        >>> ema.update(net)
        >>> ema.module(torch.zeros(1, 4)).shape
        torch.Size([1, 2])
    """

    def __init__(self, model: nn.Module, decay: float = 0.999, warmup: bool = False) -> None:
        super().__init__()
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"EMA decay must be in [0, 1), got {decay}")
        self.decay = decay
        self.warmup = warmup
        self.updates: torch.Tensor
        self.register_buffer("updates", torch.zeros((), dtype=torch.long))  # checkpointed with the average
        self.module = copy.deepcopy(model)
        self.module.requires_grad_(False)
        self.module.eval()

    def train(self, mode: bool = True) -> ModelEma:
        # The average is always evaluated in eval mode (running BatchNorm statistics).
        super().train(mode)
        self.module.eval()
        return self

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        """One EMA step towards ``model``'s current weights (same architecture as the copy).

        The warm-up decay is computed from the on-device counter, never read on the host,
        so a step costs no GPU-to-CPU synchronisation.
        """
        current = dict(model.state_dict())
        decay: torch.Tensor | float = self.decay
        if self.warmup:
            n = self.updates.to(torch.float32)
            decay = torch.clamp((1.0 + n) / (10.0 + n), max=self.decay)
        self.updates.add_(1)
        weights: dict[tuple[torch.dtype, torch.device], torch.Tensor | float] = {}
        for name, value in self.module.state_dict().items():
            source = current[name].detach()
            if value.dtype.is_floating_point:
                # lerp_: value + w * (source - value) = decay * value + (1 - decay) * source.
                key = (value.dtype, value.device)
                if key not in weights:
                    weights[key] = (1.0 - decay).to(value) if isinstance(decay, torch.Tensor) else 1.0 - decay
                value.lerp_(source.to(value.dtype), weights[key])
            else:
                value.copy_(source)

    def forward(self, *args: torch.Tensor) -> torch.Tensor:
        return self.module(*args)  # type: ignore[no-any-return]
