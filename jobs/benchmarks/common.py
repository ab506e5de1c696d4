"""Shared plumbing for benchmark scripts: output folder, command line, Fashion-MNIST features."""

from __future__ import annotations

import shlex
import statistics
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from polyclip.data.datasets import Dataset
from polyclip.features.cache import FeatureCache

OUT_ROOT = Path("runs/benchmarks")


def out_dir(name: str) -> Path:
    """``runs/benchmarks/<name>/``, created."""
    path = OUT_ROOT / name
    path.mkdir(parents=True, exist_ok=True)
    return path


def command_line() -> str:
    """The exact command that is running (for the report)."""
    script = Path(sys.argv[0]).resolve()
    try:  # `python -m jobs.benchmarks.x` puts the module's file path in argv[0]
        module = script.relative_to(Path.cwd()).with_suffix("").as_posix().replace("/", ".")
    except ValueError:
        module = script.stem
    return "python -m " + shlex.join([module, *sys.argv[1:]])


def median(values: Sequence[float]) -> float:
    return float(statistics.median(values))


def summary(values: Sequence[float]) -> dict[str, Any]:
    arr = np.asarray(values, dtype=float)
    return {"mean": float(arr.mean()), "std": float(arr.std(ddof=0)), "median": float(np.median(arr)),
            "n": int(arr.size), "values": [float(v) for v in arr]}


def pool_features(cache: FeatureCache, dataset: Dataset, spec: str, image_size: int | None, pool: str,
                  indices: np.ndarray, *, workers: int = 2, stats: dict[str, Any] | None = None) -> np.ndarray:
    """Cached features of ``dataset.<pool>[indices]`` (Ray-parallel on a miss)."""
    from jobs.features import cached_features

    source = dataset.test if pool == "test" else dataset.train
    assert source is not None
    return cached_features(cache, spec, image_size, dataset.fingerprint, dataset.spec, pool, indices,
                           source.images[indices], num_workers=workers, stats=stats)
