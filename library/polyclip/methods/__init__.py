"""Methods: task modules that hold a model and its loss.

A task is an ``nn.Module`` with

* ``forward(batch: dict[str, Tensor]) -> dict[str, Tensor]``: returns ``"loss"`` (a
  scalar to minimise) plus any scalars worth logging (``"acc"``, ``"mask_rate"``...).
  Batch keys: ``"x"`` (images ``uint8 (B, C, H, W)`` or features ``(B, D)``), ``"y"``,
  any other per-example arrays of the labeled split (``"teacher"``...), and for an
  unlabeled stream the same keys prefixed ``"u_"``.
* ``predict(x: Tensor) -> Tensor``: evaluation logits ``(B, num_classes)``.
* optionally ``after_optimizer_step() -> None`` (EMA updates, threshold schedules) and
  ``epoch_summary() -> dict[str, float]`` (per-epoch statistics such as accepted
  pseudo-labels per class), which the loop calls when present.
* optionally ``backbone`` (a :class:`polyclip.backbones.Backbone`) for tasks that train
  an encoder, which jobs export so ``create_backbone("checkpoint:<dir>")`` reuses it.

One generic loop (:mod:`polyclip.engine`) runs every task; it never branches on the method.
"""

from typing import Protocol, runtime_checkable

import torch


@runtime_checkable
class Task(Protocol):
    """What the training loop needs from a method."""

    def forward(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]: ...

    def predict(self, x: torch.Tensor) -> torch.Tensor: ...


__all__ = ["Task"]
