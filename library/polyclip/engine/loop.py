"""One generic training loop for every method's task module."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable, Iterable, Mapping

import numpy as np
import torch
from torch import nn
from torch.optim.lr_scheduler import LRScheduler

from polyclip.engine.streams import ArrayLoader
from polyclip.progress import Progress


def _unwrap(task: nn.Module) -> nn.Module:
    inner = getattr(task, "module", task)
    return inner if isinstance(inner, nn.Module) else task


def train_one_epoch(
    task: nn.Module,
    batches: Iterable[Mapping[str, torch.Tensor]],
    optimizer: torch.optim.Optimizer,
    *,
    device: torch.device,
    scheduler: LRScheduler | None = None,
    grad_clip: float | None = None,
    progress: Progress | None = None,
) -> dict[str, float]:
    """Run one epoch of ``task`` over ``batches``.

    Args:
        task: The task module (possibly DDP-wrapped); ``task(batch)["loss"]`` is minimised.
        batches: Mini-batches (see :mod:`polyclip.methods` for the keys).
        optimizer: Optimiser over the task's trainable parameters.
        device: Where batches go.
        scheduler: Stepped once per optimiser step.
        grad_clip: Max gradient norm, if set.
        progress: Advanced once per step.

    Returns:
        Mean of every scalar the task logged, plus ``"lr"``, and the task's
        ``epoch_summary()`` if it has one.
    """
    task.train()
    inner = _unwrap(task)
    after_step: Callable[[], None] | None = getattr(inner, "after_optimizer_step", None)
    sums: dict[str, float] = defaultdict(float)
    steps = 0
    for batch in batches:
        batch = {k: v.to(device, non_blocking=True) for k, v in batch.items()}
        out = task(batch)
        loss = out["loss"]
        if not torch.isfinite(loss):
            raise FloatingPointError(f"loss became {loss.item()} at step {steps}; lower the learning rate")
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if grad_clip:
            nn.utils.clip_grad_norm_(task.parameters(), grad_clip)
        optimizer.step()
        if scheduler is not None:
            scheduler.step()
        if after_step is not None:
            after_step()
        for key, value in out.items():
            if isinstance(value, torch.Tensor) and value.numel() == 1:
                sums[key] += float(value.detach())
        steps += 1
        if progress is not None:
            progress.update(1)
    logs = {("train_loss" if k == "loss" else f"train_{k}"): v / max(steps, 1) for k, v in sums.items()}
    logs["lr"] = float(optimizer.param_groups[0]["lr"])
    summary = getattr(inner, "epoch_summary", None)
    if summary is not None:
        logs.update(summary())
    return logs


@torch.no_grad()
def evaluate(
    predict: Callable[[torch.Tensor], torch.Tensor],
    x: np.ndarray,
    *,
    device: torch.device,
    batch_size: int = 256,
) -> np.ndarray:
    """Logits of ``predict`` over all of ``x`` (in order), as a float32 array."""
    loader = ArrayLoader({"x": x}, batch_size, shuffle=False)
    chunks = [predict(batch["x"].to(device)).float().cpu().numpy() for batch in loader]
    return np.concatenate(chunks)


def cross_entropy_np(logits: np.ndarray, labels: np.ndarray) -> float:
    """Mean cross-entropy of logits against labels (numpy, for validation loss)."""
    shifted = logits - logits.max(axis=1, keepdims=True)
    log_probs = shifted - np.log(np.exp(shifted).sum(axis=1, keepdims=True))
    return float(-log_probs[np.arange(len(labels)), labels].mean())
