"""Evaluation helpers around the fit loop (:mod:`polyclip.engine.fit` owns training)."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch

from polyclip.engine.fit import cross_entropy_np
from polyclip.engine.streams import ArrayLoader

__all__ = ["cross_entropy_np", "evaluate"]


@torch.no_grad()
def evaluate(
    predict: Callable[[torch.Tensor], torch.Tensor],
    x: np.ndarray,
    *,
    device: torch.device,
    batch_size: int = 256,
) -> np.ndarray:
    """Logits of ``predict`` over all of ``x`` (in order, in this process), as a float32 array."""
    loader = ArrayLoader({"x": x}, batch_size, shuffle=False)
    chunks = [predict(batch["x"].to(device)).float().cpu().numpy() for batch in loader]
    return np.concatenate(chunks)
