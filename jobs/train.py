"""Run one training job on Ray Train.

Usage::

    python -m jobs.train --config jobs/configs/demo.yaml [dotted.key=value ...] [--address ADDR]

The config is validated before Ray starts. The job loads the dataset, draws the seeded
split, lets the method's recipe prepare its data (feature caching runs in parallel on
the cluster), trains with ``TorchTrainer`` on ``scaling.num_workers`` workers, and writes
the run directory: ``config.yaml``, ``split.json``, ``metrics.json``, ``report.md``,
``confusion.png``, ``curves.png`` and the final ``checkpoint/``.
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from jobs.cli import job_parser, start_job
from jobs.config import ConfigError, DataConfig, JobConfig, load_config
from jobs.features import cached_features
from jobs.recipes import RECIPES, PrepareContext
from jobs.recipes.base import Payload
from jobs.runtime import init_ray
from jobs.semantics import label_similarity_for, semantic_metrics
from jobs.sources import SourceDataset, is_source_spec, load_source_data
from polyclip.data.datasets import Dataset, load_dataset
from polyclip.data.splits import Split, make_split
from polyclip.features.cache import FeatureCache
from polyclip.io import atomic_write_text
from polyclip.reports.run_report import summary_row, write_run_report
from polyclip.reports.tables import markdown_table

logger = logging.getLogger("polyclip")

#: Keys that may change between a run and its resumption.
RESUMABLE_KEYS = ("train.epochs", "run", "scaling")


def _load_resumable(args: argparse.Namespace) -> JobConfig:
    """The job's config; a changed config for an existing run is refused here, before Ray starts."""
    cfg = load_config(args.config, args.overrides)
    check_trainable(cfg)
    check_resumable(cfg)
    return cfg


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


def check_shared_storage(storage_path: str) -> None:
    """Fail before training when a local ``run.storage_path`` is not visible from every node.

    Checkpoints are written by the Train workers and read back by the driver; on a
    multi-node cluster a path that only the driver's node has would lose them. URIs
    (``s3://``, ``gs://``...) are shared by construction and not checked.

    Raises:
        RuntimeError: Naming the nodes that cannot see the path, and what to set.
    """
    import uuid

    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    if "://" in storage_path:
        return
    nodes = [n for n in ray.nodes() if n.get("Alive")]
    if len(nodes) < 2:
        return
    folder = Path(storage_path)
    folder.mkdir(parents=True, exist_ok=True)
    marker = folder / f".polyclip-shared-{uuid.uuid4().hex}"
    marker.write_text("visible\n")
    try:
        probe = ray.remote(num_cpus=0)(_sees)
        refs = {n["NodeManagerAddress"] + " " + n["NodeID"][:8]: probe.options(
            scheduling_strategy=NodeAffinitySchedulingStrategy(n["NodeID"], soft=False)).remote(str(marker))
            for n in nodes}
        blind = [node for node, ref in refs.items() if not ray.get(ref, timeout=120)]
    finally:
        marker.unlink(missing_ok=True)
    if blind:
        raise RuntimeError(f"run.storage_path {storage_path} is a local path that {len(blind)} of {len(nodes)} nodes "
                           f"cannot see ({', '.join(blind)}); checkpoints and predictions would be lost. Set "
                           "run.storage_path to storage every node shares: an NFS mount present on every node, or "
                           "s3://bucket/prefix")


def _sees(path: str) -> bool:
    return Path(path).exists()


def _flatten(data: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(data, dict):
        out: dict[str, Any] = {}
        for key, value in data.items():
            out.update(_flatten(value, f"{prefix}{key}."))
        return out
    return {prefix.rstrip("."): data}


def check_resumable(cfg: JobConfig) -> None:
    """Refuse to resume a run whose stored config differs in more than epochs/run/scaling."""
    stored = cfg.run_dir / "config.yaml"
    if not stored.exists():
        return
    old, new = _flatten(yaml.safe_load(stored.read_text())), _flatten(cfg.dump())
    changed = sorted(k for k in set(old) | set(new)
                     if old.get(k) != new.get(k) and not k.startswith(RESUMABLE_KEYS))
    if changed:
        raise ConfigError(
            f"run {cfg.name!r} exists in {cfg.run_dir} with a different config ({', '.join(changed)}); "
            "pick a new name, or delete that folder to start over"
        )


def check_trainable(cfg: JobConfig) -> None:
    """Refuse an evaluation-only method (nothing to train), naming the job that evaluates it.

    Raises:
        ConfigError: The method's recipe has no ``build_task``.
    """
    recipe = RECIPES[cfg.method.name]
    if not recipe.trainable:
        raise ConfigError(f"method {cfg.method.name!r} has nothing to train: run it with "
                          f"python -m {recipe.evaluated_by} --config <config> instead of jobs.train")


def run_job(cfg: JobConfig) -> dict[str, Any]:
    """Run a validated job on the connected Ray cluster; return its metrics."""
    from jobs.trainer import build_trainer, read_final_checkpoint, training_inputs

    check_trainable(cfg)  # before any data is loaded or any folder written
    t0 = time.perf_counter()
    run_dir = cfg.run_dir
    run_dir.mkdir(parents=True, exist_ok=True)
    check_shared_storage(str(cfg.run.storage_path))  # before any work
    dataset, split = load_data(cfg, run_dir)
    atomic_write_text(run_dir / "config.yaml", yaml.safe_dump(cfg.dump(), sort_keys=False))
    split.save(run_dir / "split.json")
    logger.info("%s: %d classes, %d labeled, %d unlabeled, %d val, %d test images", dataset.spec,
                dataset.num_classes, len(split.labeled), len(split.unlabeled), len(split.val), len(split.test))
    stats: dict[str, Any] = {}
    from jobs.trainer import use_gpu

    # Decided (and GPUs waited for) once, before feature encoding, which then runs on the same kind of device.
    gpu = use_gpu(cfg)
    payload = prepare_payload(cfg, dataset, split, stats, use_gpu=gpu)
    # Before training, so a label without a word vector fails now rather than after the run.
    similarity = None if cfg.word_vectors is None else label_similarity_for(cfg, dataset.class_names, payload)
    t_prepared = time.perf_counter()
    train_labels = payload.arrays("train")["y"] if isinstance(payload.train, dict) else None
    payload_ref, streamed = training_inputs(cfg, payload)
    ingest = {key: split.info["ingest_stats"] for key, split in streamed.items() if "ingest_stats" in split.info}
    trainer = build_trainer(cfg, payload_ref, streamed=streamed)
    result = trainer.fit()
    if result.checkpoint is None:
        raise RuntimeError(f"run {cfg.name!r} finished without a checkpoint (error: {result.error})")
    final = read_final_checkpoint(result.checkpoint, run_dir)
    arrays = final["arrays"]
    extra = {
        "feature_cache": stats,
        "skipped_files": [{"path": p, "reason": r} for p, r in dataset.skipped],
        "num_skipped_files": len(dataset.skipped),
        "seconds": {"prepare": round(t_prepared - t0, 2), "train": round(time.perf_counter() - t_prepared, 2)},
        "ray_storage": str(result.path),
        # Files of streamed splits that failed to decode while training (dropped, not fatal).
        "streamed_skipped_files": {key: stats.summary() for key, stats in ingest.items()},
        "resumed_from_epochs": final["resumes"],  # restarts after a worker died, or a re-run
    }
    recipe = RECIPES[cfg.method.name]
    if recipe.report is not None:  # method-specific entries (e.g. the zero-shot protocol numbers)
        extra.update(recipe.report(cfg, cfg.method, payload, arrays))
    if similarity is not None:
        extra["semantic"] = semantic_metrics(arrays["test_logits"], arrays["test_labels"], similarity,
                                             source=cfg.word_vectors.source)  # type: ignore[union-attr]
    metrics = write_run_report(
        run_dir, name=cfg.name, class_names=dataset.class_names, test_logits=arrays["test_logits"],
        test_labels=arrays["test_labels"], train_labels=train_labels, history=final["history"],
        val_logits=arrays["val_logits"], val_labels=arrays["val_labels"], extra=extra,
    )
    return metrics


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Entry point; returns the run's metrics (callable from tests)."""
    _, cfg = start_job(job_parser("python -m jobs.train", __doc__), argv, _load_resumable, connect=init_ray)
    metrics = run_job(cfg)
    print(markdown_table([summary_row(metrics)]))
    print(f"run directory: {Path(cfg.run_dir).resolve()}")
    return metrics


if __name__ == "__main__":
    main(sys.argv[1:])
