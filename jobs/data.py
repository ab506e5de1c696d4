"""The data of a training job: load and split it, let the recipe prepare its payload, encode a source's pool.

Shared by every job that trains or evaluates from a job config (``jobs.train``,
``jobs.sweep``, ``jobs.ensemble``, ``jobs.zeroshot_eval``) and by the benchmarks. Sources
(image folders, buckets, manifests) are listed, not loaded (:mod:`jobs.sources`); an
in-memory dataset (Fashion-MNIST, synthetic) is loaded whole.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

import numpy as np

from jobs.config import DataConfig, JobConfig
from jobs.features import cached_features
from jobs.recipes import RECIPES, PrepareContext
from jobs.recipes.base import Payload
from jobs.sources import SourceDataset, is_source_spec, load_source_data
from polyclip.data.datasets import Dataset, load_dataset
from polyclip.data.splits import Split, make_split
from polyclip.features.cache import FeatureCache

logger = logging.getLogger("polyclip")


def load_data(cfg: JobConfig, run_dir: Path | None = None) -> tuple[Dataset, Split]:
    """The dataset and the seeded split of a job (a source is decoded at the backbone's input size)."""
    return load_split_data(cfg.data, cfg.seed, default_image_size=decode_size(cfg), run_dir=run_dir)


def decode_size(cfg: JobConfig) -> int:
    """Side length source images are decoded at: ``data.image_size``, else what the backbone sees.

    Decoding at the backbone's input size (224 for the CLIP models) avoids decoding small
    and upsampling later; pixel and random backbones keep the old 64-px default.
    """
    if cfg.data.image_size:
        return cfg.data.image_size
    if cfg.backbone.image_size:
        return cfg.backbone.image_size
    from polyclip.backbones.factory import native_image_size

    return native_image_size(cfg.backbone.spec) or 64


def load_split_data(data: DataConfig, seed: int, *, default_image_size: int = 64,
                    run_dir: Path | None = None) -> tuple[Dataset, Split]:
    """The dataset and the seeded split described by a ``data:`` section.

    Image folders, buckets and manifests (and ``data.unlabeled_source``) are listed, not
    loaded: see :mod:`jobs.sources`. Their split is written to ``run_dir/split.parquet``.
    """
    if is_source_spec(data):
        return load_source_data(data, seed, data.image_size or default_image_size, run_dir=run_dir)
    dataset = load_dataset(data.dataset, root=data.root, image_size=data.image_size, strict=data.strict,
                           synthetic_size=data.synthetic_size, seed=seed)
    split = make_split(
        dataset.train.labels, dataset.class_names, labels_per_class=data.labels_per_class, seed=seed,
        val_per_class=data.val_per_class, unlabeled=data.unlabeled,
        test_labels=dataset.test.labels if dataset.test is not None else None, test_limit=data.test_limit,
    )
    return dataset, split


def prepare_payload(cfg: JobConfig, dataset: Dataset, split: Split, stats: dict[str, Any],
                    use_gpu: bool | None = None) -> Payload:
    """Run the method's ``prepare`` on the driver (feature caching included).

    Args:
        use_gpu: Encode features on GPU actors (the job's device decision); ``None``: if
            the cluster has GPUs now.
    """
    cache = FeatureCache(cfg.run.feature_store)

    def features(spec: str, image_size: int | None, subset: str) -> np.ndarray:
        if subset == "unlabeled" and isinstance(dataset, SourceDataset):
            return pool_features(cfg, dataset, split, spec, image_size, stats, use_gpu)
        pool = "test" if subset == "test" and split.test_from == "test" else "train"
        indices = getattr(split, subset)
        images = (dataset.test if pool == "test" else dataset.train).images[indices]  # type: ignore[union-attr]
        return cached_features(cache, spec, image_size, dataset.fingerprint, dataset.spec, pool, indices, images,
                               num_workers=cfg.run.encode_workers, stats=stats, use_gpu=use_gpu)

    ctx = PrepareContext(cfg=cfg, dataset=dataset, split=split, features=features)
    recipe = RECIPES[cfg.method.name]
    payload = recipe.prepare(ctx, cfg.method)
    recipe.check_payload(payload)
    return payload


def pool_features(cfg: JobConfig, dataset: SourceDataset, split: Split, spec: str, image_size: int | None,
                  stats: dict[str, Any], use_gpu: bool | None = None) -> np.ndarray:
    """Features of a source's unlabeled pool as one ``(N, D)`` float32 array, the input of the teachers.

    Encoded into the feature store on a miss (see :func:`encode_pool`); the pixels never
    reach the driver. A stored shard damaged since it was indexed is re-encoded.
    """
    from polyclip.features.store import ShardError

    try:
        return encode_pool(cfg, dataset, split, spec, image_size, stats, use_gpu).to_numpy()
    except ShardError as exc:  # damaged since it was indexed: re-encode the bad shards only
        logger.warning("feature store entry of the pool (%s): %s; re-encoding its damaged shards", spec, exc)
        return encode_pool(cfg, dataset, split, spec, image_size, stats, use_gpu, reuse_index=False).to_numpy()


def encode_pool(cfg: JobConfig, dataset: SourceDataset, split: Split, spec: str, image_size: int | None,
                stats: dict[str, Any], use_gpu: bool | None = None, *, reuse_index: bool = True) -> Any:
    """The feature store entry of a source's pool: decoded and encoded in Ray Data on a miss, shard by shard.

    A hit reads no pixels and no features (readers check each shard's checksum as they
    go); a killed encoding resumes with the missing shards, decoding only their images.
    Files that fail to decode are encoded as black images and reported in ``stats``.

    Args:
        reuse_index: ``False``: re-check every shard of an indexed entry (after a
            checksum error) instead of returning it.

    Returns:
        A ``polyclip.features.store.FeatureSet`` of ``N`` rows, row ``i`` the pool's image ``i``.
    """
    import ray

    from jobs.features import encode_dataset
    from jobs.ingest import IngestStats
    from polyclip.backbones import cache_identity, create_backbone
    from polyclip.features.cache import describe, feature_key
    from polyclip.features.store import FeatureStore

    store = FeatureStore(cfg.run.feature_store)
    rows = dataset.pool_size(split)
    probe = create_backbone(spec, image_size=image_size)
    key = feature_key(cache_identity(spec), probe.preprocessing.key(), dataset.fingerprint, "pool",
                      dataset.pool_rows(split))
    del probe
    start = time.perf_counter()
    entry = store.open(key)
    if reuse_index and entry is not None and entry.num_rows == rows:
        _record_pool(stats, spec, True, start, rows)
        return entry
    gpu = ray.cluster_resources().get("GPU", 0) >= 1 if use_gpu is None else use_gpu
    failed = IngestStats.create()
    # A function of the rows still missing: a resumed encoding decodes only those.
    entry = encode_dataset(lambda positions: dataset.pool_images(split, positions, failed)[0], spec, image_size,
                           store, key, use_gpu=gpu, concurrency=cfg.run.encode_workers, num_rows=rows,
                           description=describe(spec, image_size or 0, dataset.spec, "pool", rows))
    record = _record_pool(stats, spec, False, start, rows)
    bad = failed.summary()
    if bad["skipped"]:
        logger.warning("%d pool files failed to decode (%s): encoded as black images; training skips them",
                       bad["skipped"], ", ".join(f"{k}: {v}" for k, v in bad["by_reason"].items()))
        record["decode_failures"] = bad  # in metrics.json's feature_cache, by path and reason
    return entry


def _record_pool(stats: dict[str, Any], spec: str, hit: bool, start: float, rows: int) -> dict[str, Any]:
    seconds = time.perf_counter() - start
    record = {"hit": hit, "seconds": round(seconds, 3), "n": rows, "images_per_s": round(rows / max(seconds, 1e-9), 1)}
    stats.setdefault(spec, []).append(record)
    return record
