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

import yaml

from jobs.cli import job_parser, start_job
from jobs.config import ConfigError, JobConfig, load_config
from jobs.data import load_data, prepare_payload
from jobs.recipes import RECIPES
from jobs.runtime import init_ray
from jobs.semantics import label_similarity_for, semantic_metrics
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
