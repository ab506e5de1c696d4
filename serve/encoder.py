"""Member backbones for serving: uint8 image batches -> features, on the reserved device.

A replica uses CUDA only when Ray reserved a GPU for it (``ray.get_gpu_ids()``): a GPU
that is merely visible may belong to another replica or to a training job. On CUDA the
encoder runs under bf16 autocast where the GPU supports it (fp16 otherwise), unless
``precision`` says otherwise; on CPU it always runs in fp32.
"""

from __future__ import annotations

from contextlib import nullcontext
from typing import Literal

import numpy as np
import torch

from polyclip.backbones import create_backbone

Precision = Literal["auto", "fp32", "bf16", "fp16"]


def reserved_gpu_ids() -> list[str]:
    """GPU ids Ray reserved for this worker (empty outside Ray or without a GPU reservation)."""
    try:
        import ray

        if not ray.is_initialized():
            return []
        return [str(i) for i in ray.get_gpu_ids()]
    except Exception:  # not in a Ray worker: nothing was reserved
        return []


def replica_device(gpu_ids: list[str] | None = None) -> torch.device:
    """``cuda`` when a GPU was reserved for this replica and CUDA works, else ``cpu``."""
    ids = reserved_gpu_ids() if gpu_ids is None else gpu_ids
    return torch.device("cuda") if ids and torch.cuda.is_available() else torch.device("cpu")


def autocast_dtype(device: torch.device, precision: Precision) -> torch.dtype | None:
    """The inference autocast dtype: ``None`` (fp32) on CPU or for ``fp32``."""
    if device.type != "cuda" or precision == "fp32":
        return None
    if precision == "fp16":
        return torch.float16
    if precision == "bf16" or torch.cuda.is_bf16_supported():
        return torch.bfloat16
    return torch.float16


class MemberEncoder:
    """One member backbone, rebuilt from the artifact's spec and checked against it.

    Args:
        spec: ``create_backbone`` spec.
        image_size: Its input side.
        num_features: Feature dimension the artifact's head expects.
        device: Where to run.
        precision: ``auto`` (bf16/fp16 autocast on CUDA), ``fp32``, ``bf16`` or ``fp16``.

    Raises:
        ValueError: The rebuilt backbone gives another feature dimension.
    """

    def __init__(self, spec: str, image_size: int | None, num_features: int, device: torch.device,
                 precision: Precision = "auto") -> None:
        self.device = device
        self.backbone = create_backbone(spec, image_size=image_size).eval().to(device)
        if self.backbone.num_features != num_features:
            raise ValueError(f"backbone {spec!r} gives {self.backbone.num_features} features but the artifact's "
                             f"head expects {num_features}: the weights differ from the ones it was fitted on")
        self.dtype = autocast_dtype(device, precision)

    @torch.inference_mode()
    def __call__(self, images: np.ndarray) -> np.ndarray:
        """Features ``(B, D)`` float32 of ``uint8`` images ``(B, C, S, S)``."""
        x = torch.from_numpy(images).to(self.device, non_blocking=True)
        context = torch.autocast(self.device.type, dtype=self.dtype) if self.dtype is not None else nullcontext()
        with context:
            features = self.backbone.encode(x)
        return features.float().cpu().numpy()
