"""Feature caching across the Ray cluster: encode once, in parallel, reuse everywhere."""

from __future__ import annotations

import logging
import time
from typing import Any

import numpy as np

from polyclip.backbones import create_backbone
from polyclip.features.cache import FeatureCache, describe, encode_images, feature_key
from polyclip.progress import Progress, format_seconds

logger = logging.getLogger("polyclip")


class _Encoder:
    """A Ray actor holding one backbone; encodes chunks of images."""

    def __init__(self, spec: str, image_size: int | None, threads: int) -> None:
        import torch

        torch.set_num_threads(threads)
        # Every actor must build the same weights: a `random:` spec would otherwise give
        # each chunk of one feature set its own random network.
        torch.manual_seed(0)
        self.backbone = create_backbone(spec, image_size=image_size)

    def encode(self, images: np.ndarray) -> np.ndarray:
        return encode_images(self.backbone, images, batch_size=100)


def cached_features(
    cache: FeatureCache,
    spec: str,
    image_size: int | None,
    dataset_fingerprint: str,
    dataset_spec: str,
    pool: str,
    indices: np.ndarray,
    images: np.ndarray,
    *,
    num_workers: int = 2,
    chunk: int = 250,
    stats: dict[str, Any] | None = None,
) -> np.ndarray:
    """Features of ``images`` from the cache, or encoded by ``num_workers`` Ray actors.

    Args:
        cache: The on-disk cache.
        spec: Backbone spec.
        image_size: Input size override (part of the key).
        dataset_fingerprint: ``Dataset.fingerprint``.
        dataset_spec: For the entry's description.
        pool: ``"train"`` or ``"test"``.
        indices: Indices of ``images`` in the pool (part of the key).
        images: The uint8 images to encode on a miss.
        num_workers: Parallel encoder actors.
        chunk: Images per task (progress granularity).
        stats: If given, ``{"hit": bool, "seconds": float, "images_per_s": float}`` is
            appended under the spec for the run report.
    """
    import ray

    probe = create_backbone(spec, image_size=image_size)
    key = feature_key(spec + weights_stamp(spec), probe.preprocessing.key(), dataset_fingerprint, pool, indices)
    start = time.perf_counter()
    hit = cache.get(key)
    if hit is not None:
        logger.info("features %s (%s, %d images): cache hit %s", spec, pool, len(indices), cache.path(key))
        _record(stats, spec, True, time.perf_counter() - start, len(indices))
        return hit
    del probe
    workers = max(1, min(num_workers, -(-len(images) // chunk)))
    # Restartable: an encoder killed mid-chunk (node loss, the memory monitor) is
    # rebuilt and its chunk retried instead of failing the whole job.
    actor_cls = ray.remote(num_cpus=1, max_restarts=3, max_task_retries=3)(_Encoder)
    actors = [actor_cls.remote(spec, image_size, 1) for _ in range(workers)]  # type: ignore[attr-defined]
    pending: dict[Any, int] = {}
    starts = list(range(0, len(images), chunk))
    progress = Progress(f"encode {spec} ({pool})", len(images), unit="img", interval=5.0)
    results: dict[int, np.ndarray] = {}
    queue = list(starts)
    try:
        for actor in actors:
            if queue:
                s = queue.pop(0)
                pending[actor.encode.remote(images[s : s + chunk])] = s
        owner = {ref: actors[i] for i, ref in enumerate(pending)}
        while pending:
            done, _ = ray.wait(list(pending), num_returns=1)
            ref = done[0]
            s = pending.pop(ref)
            actor = owner.pop(ref)
            results[s] = ray.get(ref)
            progress.update(len(results[s]))
            if queue:
                nxt = queue.pop(0)
                new_ref = actor.encode.remote(images[nxt : nxt + chunk])
                pending[new_ref] = nxt
                owner[new_ref] = actor
    finally:
        for actor in actors:
            ray.kill(actor)
    elapsed = progress.close()
    features = np.concatenate([results[s] for s in starts])
    cache.put(key, features, describe(spec, image_size or 0, dataset_spec, pool, len(indices)))
    logger.info("cached %s in %s", cache.path(key), format_seconds(elapsed))
    _record(stats, spec, False, time.perf_counter() - start, len(indices))
    return features


def weights_stamp(spec: str) -> str:
    """Size and modification time of the local weights a spec reads, for the cache key.

    ``checkpoint:<dir>`` and ``...@<file>`` specs name a path whose content can change
    (pretraining again into the same folder); the stamp makes the cache see that.
    """
    from pathlib import Path

    kind, _, arg = spec.partition(":")
    if kind == "checkpoint":
        from polyclip.backbones.factory import _checkpoint_dir

        path = _checkpoint_dir(arg) / "backbone.pt"
    elif "@" in arg and kind in {"timm", "open_clip"}:
        path = Path(arg.partition("@")[2]).expanduser()
    else:
        return ""
    stat = path.stat()
    return f"#{stat.st_size}-{stat.st_mtime_ns}"


def _record(stats: dict[str, Any] | None, spec: str, hit: bool, seconds: float, n: int) -> None:
    if stats is not None:
        stats.setdefault(spec, []).append(
            {"hit": hit, "seconds": round(seconds, 3), "n": n, "images_per_s": round(n / max(seconds, 1e-9), 1)}
        )
