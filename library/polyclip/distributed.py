"""Collectives that check their tensors' device first: NCCL's device rule, enforced everywhere.

NCCL has no CPU implementation: on a GPU cluster, an ``all_reduce`` of a CPU tensor fails
with ``No backend type associated with device type cpu``, while the same code passes
every test under gloo, which accepts CPU and CUDA tensors alike. Every collective in the
library goes through the wrappers here, which check each tensor before the collective:

* against the *expected device*: the device of the batch the caller computed from (passed
  as ``expected``), else the process-wide training device (:func:`set_training_device`).
  A counter kept in a hard-coded CPU buffer fails this check on any machine, also in a
  single-process test, when the batch lives elsewhere (CUDA, or PyTorch's ``meta`` device
  in CPU-only tests);
* against the devices the process group has a backend for (``cuda:nccl`` handles CUDA
  tensors only), with a message naming the tensor's device and the backend instead of
  NCCL's.

Without a process group, or with one worker, the wrappers check and return the tensor
unchanged: the same code runs on a laptop and on a cluster.

Example:
    >>> import torch
    >>> counts = torch.ones(3)
    >>> all_reduce(counts, expected=counts.device) is counts  # no process group: checked only
    True
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import torch
import torch.distributed as dist

_training_device: torch.device | None = None


class CollectiveDeviceError(RuntimeError):
    """A collective got a tensor on a device its caller or its process group does not expect."""


def set_training_device(device: torch.device | str | None) -> None:
    """Declare the device this worker trains on; collectives without ``expected`` check against it.

    Args:
        device: The training device (``"cuda:0"``...), or None to check only the backend.
    """
    global _training_device
    _training_device = torch.device(device) if device is not None else None


def training_device() -> torch.device | None:
    """The device declared by :func:`set_training_device`, or None."""
    return _training_device


@contextmanager
def on_training_device(device: torch.device | str | None) -> Iterator[None]:
    """Declare the training device for the duration of a block (restores the previous one)."""
    previous = _training_device
    set_training_device(device)
    try:
        yield
    finally:
        set_training_device(previous)


def is_distributed() -> bool:
    """True when a ``torch.distributed`` process group with more than one worker exists."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def world_size() -> int:
    """Workers in the default process group (1 without one)."""
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def rank() -> int:
    """This worker's rank in the default process group (0 without one)."""
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def backend_device_types(group: dist.ProcessGroup | None = None) -> frozenset[str]:
    """Device types the process group has a backend for (empty without a process group).

    ``init_process_group("nccl")`` gives ``{"cuda"}``, ``"gloo"`` gives ``{"cpu", "cuda"}``,
    ``"cuda:gloo"`` gives ``{"cuda"}`` (how the tests reproduce NCCL's rule on a CPU box).
    """
    if not (dist.is_available() and dist.is_initialized()):
        return frozenset()
    config = dist.get_backend_config(group)  # "cpu:gloo,cuda:gloo", "cuda:nccl", ...
    return frozenset(part.split(":", 1)[0].strip() for part in config.split(",") if ":" in part)


def _same_device(actual: torch.device, expected: torch.device) -> bool:
    # "cuda" (no index) names the current CUDA device: match on the type only.
    if actual.type != expected.type:
        return False
    return expected.index is None or actual.index is None or actual.index == expected.index


def check_devices(op: str, tensors: Sequence[torch.Tensor], expected: torch.device | None = None,
                  group: dist.ProcessGroup | None = None) -> None:
    """Raise :class:`CollectiveDeviceError` unless every tensor may enter the collective ``op``.

    Args:
        op: The collective's name, for the message.
        tensors: The tensors it would send or receive.
        expected: Where they must live (the caller's batch device); the training device if None.
        group: The process group (the default one if None).

    Raises:
        CollectiveDeviceError: A tensor is not on ``expected``, or on a device type the
            process group has no backend for.
    """
    want = expected if expected is not None else _training_device
    supported = backend_device_types(group)
    for i, tensor in enumerate(tensors):
        if want is not None and not _same_device(tensor.device, want):
            raise CollectiveDeviceError(
                f"{op}: tensor {i} {tuple(tensor.shape)} is on {tensor.device}, but the training device is {want}; "
                "collectives must run on the training device (NCCL has no CPU backend)")
        if supported and tensor.device.type not in supported:
            raise CollectiveDeviceError(
                f"{op}: tensor {i} {tuple(tensor.shape)} is on {tensor.device}, but the process group's backend "
                f"({dist.get_backend_config(group)}) only handles {sorted(supported)} tensors")


def all_reduce(tensor: torch.Tensor, op: dist.ReduceOp.RedOpType = dist.ReduceOp.SUM, *,
               expected: torch.device | None = None, group: dist.ProcessGroup | None = None) -> torch.Tensor:
    """``torch.distributed.all_reduce`` in place, after :func:`check_devices`; returns ``tensor``.

    Args:
        tensor: Reduced in place over all workers (left as is with one worker).
        op: The reduction (sum by default).
        expected: The device ``tensor`` must be on (the batch's); the training device if None.
        group: The process group (the default one if None).
    """
    check_devices("all_reduce", [tensor], expected, group)
    if is_distributed():
        dist.all_reduce(tensor, op=op, group=group)
    return tensor


def all_gather(tensor: torch.Tensor, *, expected: torch.device | None = None,
               group: dist.ProcessGroup | None = None) -> list[torch.Tensor]:
    """Every worker's ``tensor`` (same shape on all), in rank order, after :func:`check_devices`.

    Args:
        tensor: This worker's part.
        expected: The device ``tensor`` must be on; the training device if None.
        group: The process group (the default one if None).

    Returns:
        ``world_size`` tensors on ``tensor``'s device; ``[tensor]`` with one worker.
    """
    check_devices("all_gather", [tensor], expected, group)
    if not is_distributed():
        return [tensor]
    chunks = [torch.empty_like(tensor) for _ in range(dist.get_world_size(group))]
    dist.all_gather(chunks, tensor.contiguous(), group=group)
    return chunks


__all__ = ["CollectiveDeviceError", "all_gather", "all_reduce", "backend_device_types", "check_devices",
           "is_distributed", "on_training_device", "rank", "set_training_device", "training_device",
           "world_size"]
