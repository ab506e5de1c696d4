"""The benchmark harness: output folder, exact command line, report, a free port, cached features.

Every script under ``jobs/benchmarks/`` writes into ``runs/benchmarks/<name>/`` (:func:`out_dir`),
records the command that reproduces it (:func:`command_line`), writes its report with
:func:`write_results` and reads frozen-backbone features through :func:`pool_features`, the
project's feature store under the one key of ``jobs.features.cached_features``.

This module imports neither Ray, matplotlib nor the feature store (pyarrow) at import time:
``gpu_check`` runs on a machine with torch and the library only.
"""

from __future__ import annotations

import os
import shlex
import socket
import statistics
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from polyclip.io import atomic_write_json, atomic_write_text
from polyclip.reports.tables import markdown_table

if TYPE_CHECKING:
    from polyclip.data.datasets import Dataset
    from polyclip.features.cache import FeatureCache

OUT_ROOT = Path("runs/benchmarks")

#: A piece of a markdown report: text as it is, or rows rendered as a table.
Block = str | Sequence[Mapping[str, Any]]


def out_dir(name: str | os.PathLike[str], root: Path = OUT_ROOT) -> Path:
    """``runs/benchmarks/<name>/``, created; a path with a folder in it (a ``--out`` value) is used as it is."""
    path = Path(name)
    if len(path.parts) == 1 and not path.is_absolute():
        path = root / path
    path.mkdir(parents=True, exist_ok=True)
    return path


def command_line(argv: Sequence[str] | None = None, module: str | None = None) -> str:
    """The exact command that is running, ``python -m <module> <args>``, for the report.

    Args:
        argv: The arguments ``main(argv)`` was called with; ``None`` means ``sys.argv[1:]``.
        module: The benchmark's module (its ``__spec__.name``). ``None`` derives it from
            ``sys.argv[0]``, which ``python -m`` sets to the module's file; a test calling
            ``main(argv)`` must name it.
    """
    if module is None:
        script = Path(sys.argv[0]).resolve()
        try:
            module = script.relative_to(Path.cwd()).with_suffix("").as_posix().replace("/", ".")
        except ValueError:
            module = script.stem
    return shlex.join(["python", "-m", module, *(sys.argv[1:] if argv is None else argv)])


def announce(argv: Sequence[str] | None, module: str) -> str:
    """Print ``command: <the exact command>`` (flushed, so it leads the log) and return the command."""
    command = command_line(argv, module)
    print(f"command: {command}", flush=True)
    return command


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that was free on ``host`` a moment ago (the OS picks it; another process may still take it)."""
    with socket.socket() as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def write_results(folder: Path, command: str, rows: Sequence[Mapping[str, Any]], *, title: str,
                  blocks: Sequence[Block] | None = None, extra: Mapping[str, Any] | None = None,
                  floatfmt: str = ".4f", stem: str = "results") -> str:
    """Write the report, ``<stem>.json`` and ``<stem>.md`` in ``folder``, each atomically; return the markdown.

    Args:
        folder: The run's folder (:func:`out_dir`).
        command: The exact command (:func:`command_line`).
        rows: The result rows: ``"rows"`` in the JSON.
        title: The markdown's heading.
        blocks: The markdown's body after the heading and the command, in order: a string
            as it is, a list of rows as a table. ``None``: the table of ``rows``.
        extra: More JSON fields (after ``command``, ``loadavg`` and ``rows``).
        floatfmt: Format of floats in the tables.
        stem: File name without its suffix.
    """
    report = {"command": command, "loadavg": os.getloadavg(), "rows": list(rows), **(extra or {})}
    atomic_write_json(folder / f"{stem}.json", report)
    body = [rows] if blocks is None else blocks
    parts = [f"# {title}\n", f"`{command}`\n"]
    parts += [block if isinstance(block, str) else markdown_table(block, floatfmt=floatfmt) for block in body]
    markdown = "\n".join(parts)
    atomic_write_text(folder / f"{stem}.md", markdown)
    return markdown


def median(values: Sequence[float]) -> float:
    return float(statistics.median(values))


def summary(values: Sequence[float]) -> dict[str, Any]:
    arr = np.asarray(values, dtype=float)
    return {"mean": float(arr.mean()), "std": float(arr.std(ddof=0)), "median": float(np.median(arr)),
            "n": int(arr.size), "values": [float(v) for v in arr]}


def feature_cache_key(spec: str, image_size: int | None, dataset: Dataset, pool: str, indices: np.ndarray) -> str:
    """The feature store key of ``jobs.features.cached_features`` for these images.

    Builds the backbone to read its preprocessing key; the spec's cache identity makes a
    ``checkpoint:`` spec's entry change when its weights do.
    """
    from polyclip.backbones import cache_identity, create_backbone
    from polyclip.features.cache import feature_key

    preprocessing = create_backbone(spec, image_size=image_size).preprocessing.key()
    return feature_key(cache_identity(spec), preprocessing, dataset.fingerprint, pool, indices)


def pool_features(cache: FeatureCache, dataset: Dataset, spec: str, image_size: int | None, pool: str,
                  indices: np.ndarray, *, workers: int = 2, stats: dict[str, Any] | None = None,
                  use_ray: bool = True) -> np.ndarray:
    """Features of ``dataset.<pool>[indices]`` from the feature store, encoded on a miss.

    Both ways read and fill the same entry (the key of ``jobs.features.cached_features``),
    so a benchmark run without Ray reuses what a Ray job encoded, and the other way round.

    Args:
        cache: The feature cache.
        dataset: The dataset the indices are of.
        spec: Backbone spec.
        image_size: Input size override (part of the key).
        pool: ``"train"`` or ``"test"``.
        indices: Rows of the pool.
        workers: Encoder actors on a miss (Ray).
        stats: Filled as ``cached_features`` fills it (Ray).
        use_ray: Encode a miss through Ray Data actors (needs ``ray.init``); ``False``
            encodes it in this process (for a machine too loaded to start Ray).
    """
    source = dataset.test if pool == "test" else dataset.train
    if source is None:
        raise ValueError(f"{dataset.spec} has no {pool} pool")
    if use_ray:
        from jobs.features import cached_features

        return cached_features(cache, spec, image_size, dataset.fingerprint, dataset.spec, pool, indices,
                               source.images[indices], num_workers=workers, stats=stats)
    key = feature_cache_key(spec, image_size, dataset, pool, indices)
    hit = cache.get(key)
    if hit is not None:
        return hit
    from polyclip.backbones import create_backbone
    from polyclip.features.cache import describe, encode_images

    tic = time.perf_counter()
    features = encode_images(create_backbone(spec, image_size=image_size), source.images[indices], batch_size=100)
    cache.put(key, features, describe(spec, image_size or 0, dataset.spec, pool, len(indices)))
    print(f"encoded {spec} {pool} ({len(indices)} images) in-process in {time.perf_counter() - tic:.0f} s",
          flush=True)
    return features


#: The seed-0 train-pool split of ``devise_zeroshot`` and ``moe_vs_flat``: labeled and held-out images per class.
POOL_LABELED, POOL_VAL = 500, 100


def lite0_pool(dataset: Dataset, cache: FeatureCache, image_size: int, *, workers: int = 2
               ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """EfficientNet-Lite0 features and labels of the seed-0 labeled train pool and of the whole test set.

    ``devise_zeroshot`` and ``moe_vs_flat`` train on the same pool, so its features are encoded once.

    Returns:
        ``x_lab, y_lab, x_test, y_test``.
    """
    from polyclip.data.splits import make_split

    if dataset.test is None:
        raise ValueError(f"{dataset.spec} has no test pool")
    split = make_split(dataset.train.labels, list(dataset.class_names), labels_per_class=POOL_LABELED, seed=0,
                       val_per_class=POOL_VAL, test_labels=dataset.test.labels)
    spec = "efficientnet_lite:0"
    x_test = pool_features(cache, dataset, spec, image_size, "test", split.test, workers=workers)
    x_lab = pool_features(cache, dataset, spec, image_size, "train", split.labeled, workers=workers)
    return x_lab, dataset.train.labels[split.labeled], x_test, dataset.test.labels[split.test]
