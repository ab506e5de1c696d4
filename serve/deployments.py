"""The encoder deployments of the served ensemble and their Serve options.

``per_backbone`` mode binds one :class:`BackboneEncoder` deployment per member, each with
its own replicas, CPUs, GPUs or autoscaling; ``single`` mode keeps a
:class:`LocalEncoders` inside the ingress replica. Both batch concurrent requests with
``@serve.batch`` and run the model on a thread of their own, so the event loop keeps
accepting requests while a batch runs.
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from ray import serve

from polyclip.ensemble import BackboneInfo
from serve.encoder import MemberEncoder, Precision, replica_device

if TYPE_CHECKING:
    from serve.app import AppArgs


def deployment_name(backbone: str) -> str:
    """The Serve deployment of one member: ``efficientnet_lite:0`` -> ``Encoder_efficientnet_lite_0``."""
    return "Encoder_" + re.sub(r"[^A-Za-z0-9_]+", "_", backbone).strip("_")


def per_backbone(value: float | dict[str, Any], name: str, default: float, field: str,
                 names: Sequence[str]) -> float:
    """One backbone's value of a setting given as one number or ``{backbone: number}``.

    Raises:
        ValueError: The mapping names backbones the artifact lacks.
    """
    if not isinstance(value, dict):
        return value
    unknown = sorted(set(value) - set(names))
    if unknown:
        raise ValueError(f"{field}: unknown backbones {unknown}; the artifact has {list(names)}")
    return value.get(name, default)


def member_image_size(info: BackboneInfo) -> int | None:
    """The input side ``create_backbone`` must rebuild a member with (artifact field or preprocessing)."""
    size = info.image_size or (info.preprocessing or {}).get("image_size")
    return None if size is None else int(size)  # type: ignore[call-overload]


def encoder_options(args: AppArgs, info: BackboneInfo, names: Sequence[str]) -> dict[str, Any]:
    """``BackboneEncoder.options(...)`` of one member: name, replicas or autoscaling, resources, queues.

    Raises:
        ValueError: Unknown backbone in a per-backbone mapping, or an autoscaling_config
            that Serve's ``AutoscalingConfig`` rejects (its message names the field).
    """
    replicas = int(per_backbone(args.num_replicas, info.name, 1, "num_replicas", names))  # type: ignore[arg-type]
    cpus = per_backbone(args.num_cpus, info.name, 0.25, "num_cpus", names)  # type: ignore[arg-type]
    gpus = per_backbone(args.num_gpus, info.name, 0.0, "num_gpus", names)  # type: ignore[arg-type]
    options: dict[str, Any] = {
        "name": deployment_name(info.name),
        "ray_actor_options": {"num_cpus": cpus, "num_gpus": gpus},
        # The ingress bounds the requests in flight; each sends at most one call per encoder.
        "max_ongoing_requests": max(2 * args.batch_max_size, 8),
        "max_queued_requests": max(args.max_ongoing_requests * args.ingress_replicas, 1) * 2,
    }
    if args.autoscaling_config is not None:
        from ray.serve.config import AutoscalingConfig

        unknown = sorted(set(args.autoscaling_config) - set(AutoscalingConfig.model_fields))
        if unknown:  # Serve would ignore a misspelt key silently
            raise ValueError(f"autoscaling_config: unknown keys {unknown}; valid: "
                             f"{sorted(AutoscalingConfig.model_fields)}")
        try:
            options["autoscaling_config"] = AutoscalingConfig(**args.autoscaling_config).model_dump(
                exclude_unset=True)
        except Exception as exc:  # pydantic's ValidationError names the bad field
            raise ValueError(f"autoscaling_config {args.autoscaling_config}: {exc}") from None
    else:
        options["num_replicas"] = replicas
    return options


def _thread_pool(torch_threads: int) -> ThreadPoolExecutor:
    """One model thread: runs batches off the event loop, with ``torch_threads`` intra-op threads."""
    return ThreadPoolExecutor(1, thread_name_prefix="encoder", initializer=torch.set_num_threads,
                              initargs=(torch_threads,))


@serve.deployment
class BackboneEncoder:
    """One member backbone: batches of uint8 images -> features.

    Args:
        spec: ``create_backbone`` spec from the artifact.
        image_size: Its input size.
        num_features: Expected feature dimension (checked against the artifact).
        batch_max_size, batch_wait_timeout_s: ``@serve.batch`` settings.
        torch_threads: Intra-op threads.
        precision: Inference precision on CUDA (see :mod:`serve.encoder`).
    """

    def __init__(self, spec: str, image_size: int | None, num_features: int, batch_max_size: int,
                 batch_wait_timeout_s: float, torch_threads: int, precision: Precision = "auto") -> None:
        torch.set_num_threads(torch_threads)
        self.encoder = MemberEncoder(spec, image_size, num_features, replica_device(), precision)
        self.device = self.encoder.device
        self.pool = _thread_pool(torch_threads)
        self.encode_batch.set_max_batch_size(batch_max_size)  # type: ignore[attr-defined]
        self.encode_batch.set_batch_wait_timeout_s(batch_wait_timeout_s)  # type: ignore[attr-defined]

    @serve.batch(max_batch_size=16, batch_wait_timeout_s=0.002)
    async def encode_batch(self, images: list[np.ndarray]) -> list[np.ndarray]:
        features = await asyncio.get_running_loop().run_in_executor(self.pool, self.encoder, np.stack(images))
        return list(features)

    async def __call__(self, image: np.ndarray) -> np.ndarray:
        """Features ``(D,)`` of one ``uint8`` ``(C, S, S)`` image (batched with concurrent calls)."""
        return await self.encode_batch(image)

    def device_name(self) -> str:
        """The device this replica encodes on (``cpu`` or ``cuda``)."""
        return self.device.type


class LocalEncoders:
    """Every member encoder inside the ingress (``deployment_mode: single``).

    Args:
        backbones: The artifact's members, in cost order.
        precision, torch_threads: As for :class:`BackboneEncoder`.
        batch_max_size, batch_wait_timeout_s: ``@serve.batch`` over whole requests.
    """

    def __init__(self, backbones: Sequence[BackboneInfo], precision: Precision, torch_threads: int,
                 batch_max_size: int, batch_wait_timeout_s: float) -> None:
        device = replica_device()
        self.encoders = [MemberEncoder(info.spec, member_image_size(info), info.num_features, device, precision)
                         for info in backbones]
        self.device = device
        self.pool = _thread_pool(torch_threads)
        self.encode_all.set_max_batch_size(batch_max_size)  # type: ignore[attr-defined]
        self.encode_all.set_batch_wait_timeout_s(batch_wait_timeout_s)  # type: ignore[attr-defined]

    def _run(self, requests: list[list[np.ndarray]]) -> list[list[np.ndarray]]:
        per_member = [encoder(np.stack([r[b] for r in requests])) for b, encoder in enumerate(self.encoders)]
        return [[features[i] for features in per_member] for i in range(len(requests))]

    @serve.batch(max_batch_size=16, batch_wait_timeout_s=0.002)
    async def encode_all(self, requests: list[list[np.ndarray]]) -> list[list[np.ndarray]]:
        """Features of every member for one request's inputs (batched with concurrent requests)."""
        return await asyncio.get_running_loop().run_in_executor(self.pool, self._run, requests)

    async def encode_one(self, b: int, image: np.ndarray) -> np.ndarray:
        """Member ``b``'s features ``(D,)`` of one image (cascade steps)."""
        features = await asyncio.get_running_loop().run_in_executor(self.pool, self.encoders[b], image[None])
        return features[0]
