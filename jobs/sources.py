"""Datasets backed by image sources (folders, buckets, manifests) instead of arrays in driver memory.

The driver lists the source (paths, labels, sizes; no pixels), draws the seeded split from
the labels alone, and writes it to the run folder as a Parquet manifest. Only the small
subsets (the few labeled images, validation, test) are ever decoded for the driver, in
Ray Data tasks across the cluster; the unlabeled pool (from the labeled folders, or from
``data.unlabeled_source``, a flat folder, bucket prefix or manifest) stays a lazy Ray
Dataset that the Train workers stream (:mod:`jobs.streaming`).

A corrupt or unreadable file among the decoded subsets is reported and leaves the
listing; the split is then drawn again without it (same seed, so the result depends only
on the readable files). Corrupt files in the pool are dropped while streaming and
counted.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

from jobs.config import DataConfig
from jobs.streaming import StreamedSplit
from polyclip.data.datasets import Dataset, DatasetError
from polyclip.data.sources import class_names_of, fingerprint, open_source, write_split_manifest
from polyclip.data.splits import Split, make_split

logger = logging.getLogger("polyclip")

#: Subsets decoded into driver memory beyond this many images are refused (set data.test_limit).
MAX_DECODED = 50_000
#: Redraws of the split when decoded subsets held corrupt files.
MAX_REDRAWS = 5
#: Labels of pool images that have none (an unlabeled source).
NO_LABEL = -1


def is_source_spec(data: DataConfig) -> bool:
    """Whether a ``data:`` section reads from a source (image folder, bucket, manifest) rather than arrays."""
    return data.dataset.partition(":")[0] in {"imagefolder", "manifest"} or data.unlabeled_source is not None


class DecodedImages:
    """``images[indices]`` decodes those rows of a source table in Ray Data tasks, once.

    Used for the small subsets; the decoded rows are kept so that the recipe, the feature
    cache and the report see the same pixels.
    """

    def __init__(self, table: pa.Table, image_size: int, channels: int, shape_rows: int) -> None:
        self.table, self.image_size, self.channels = table, image_size, channels
        self.shape = (shape_rows, channels, image_size, image_size)
        self.decoded: dict[int, np.ndarray] = {}
        self.failed: dict[int, str] = {}

    def __len__(self) -> int:
        return self.shape[0]

    def decode(self, rows: np.ndarray) -> None:
        """Decode the rows not decoded yet; failures land in :attr:`failed` (row -> reason)."""
        from jobs.ingest import IngestStats, image_dataset

        todo = np.array(sorted({int(r) for r in rows} - set(self.decoded) - set(self.failed)), dtype=np.int64)
        if len(todo) == 0:
            return
        stats = IngestStats.create()
        ds = image_dataset(self.table, self.image_size, channels=self.channels, rows=todo, stats=stats)
        for batch in ds.iter_batches(batch_size=256, batch_format="numpy"):
            for row, image in zip(batch["row"], batch["image"]):
                self.decoded[int(row)] = image
        summary = stats.summary()
        for row in todo:
            if int(row) not in self.decoded:
                self.failed[int(row)] = "unreadable or corrupt"
        by_path = {entry["path"]: f"{entry['reason']}: {entry.get('error', '')}" for entry in summary.get("paths", [])}
        paths = self.table.column("path")
        for row in self.failed:
            path = paths[row].as_py()
            self.failed[row] = by_path.get(path, self.failed[row])

    def __getitem__(self, rows: Any) -> np.ndarray:
        rows = np.asarray(rows, dtype=np.int64)
        if len(rows) > MAX_DECODED:
            raise DatasetError(f"{len(rows)} images would be decoded into the driver's memory (more than "
                               f"{MAX_DECODED}); cap the test set with data.test_limit or the validation set "
                               "with data.val_per_class")
        self.decode(rows)
        missing = [int(r) for r in rows if int(r) not in self.decoded]
        if missing:
            raise DatasetError(f"{len(missing)} rows could not be decoded, e.g. "
                               f"{self.table.column('path')[missing[0]].as_py()}")
        if len(rows) == 0:
            return np.zeros((0, self.channels, self.image_size, self.image_size), np.uint8)
        return np.stack([self.decoded[int(r)] for r in rows])


@dataclass
class SourcePool:
    """The labeled source as the recipes see a pool: labels in memory, images decoded on demand."""

    images: DecodedImages
    labels: np.ndarray
    paths: list[str] | None = None

    def __len__(self) -> int:
        return len(self.labels)


@dataclass
class SourceDataset(Dataset):
    """A :class:`~polyclip.data.datasets.Dataset` whose images stay in the source until asked for.

    Attributes:
        table: The labeled listing (``path``, ``label``, ``size``, ``mtime_ns``).
        pool_table: The unlabeled source's listing, when ``data.unlabeled_source`` is set.
        image_size: Decode size (shorter side resized, centre crop).
        channels: 3 (RGB) or 1.
        source_fingerprint: Hash of paths, sizes and modification times of both listings.
    """

    table: pa.Table = None  # type: ignore[assignment]
    pool_table: pa.Table | None = None
    image_size: int = 0
    channels: int = 3
    source_fingerprint: str = ""
    info: dict[str, Any] = field(default_factory=dict)

    @property
    def fingerprint(self) -> str:  # type: ignore[override]
        return self.source_fingerprint[:16]

    def _pool_rows(self, split: Split) -> tuple[pa.Table, np.ndarray, np.ndarray | None]:
        if self.pool_table is not None:
            return self.pool_table, np.arange(self.pool_table.num_rows), None
        return self.table, np.asarray(split.unlabeled), self.train.labels

    def pool_images(self, split: Split, positions: np.ndarray | None = None,
                    stats: Any = None) -> tuple[Any, int]:
        """The pool as ``{"row": position in the pool, "image"}`` (for the feature store), and its size.

        Every row is kept: a file that fails to decode becomes an all-black image (counted
        in ``stats``, a ``jobs.ingest.IngestStats``), so that the store has a feature for
        every pool image; the training stream drops such files.

        Args:
            positions: Only these positions in the pool are read and decoded (e.g. the rows
                of the shards a resumed encoding still misses); ``None``: all.
        """
        from jobs.ingest import image_dataset

        table, rows, _ = self._pool_rows(split)
        position = np.full(table.num_rows, -1, dtype=np.int64)
        position[rows] = np.arange(len(rows))
        wanted = rows if positions is None else rows[np.asarray(positions, dtype=np.int64)]
        ds = image_dataset(table, self.image_size, channels=self.channels, rows=wanted, stats=stats,
                           keep_failed=True)
        return ds.map_batches(_Renumber(position), batch_format="numpy", num_cpus=0.25), len(rows)

    def pool_rows(self, split: Split) -> np.ndarray:
        """Rows of the pool in its listing (the labeled listing's unlabeled rows, or the whole pool source)."""
        return self._pool_rows(split)[1]

    def pool_size(self, split: Split) -> int:
        return len(self._pool_rows(split)[1])

    def pool_split(self, split: Split, extra: dict[str, np.ndarray] | None = None, *,
                   held_back_labels: bool = True) -> StreamedSplit:
        """The unlabeled pool as a lazy Ray Dataset with columns ``x`` (and ``y``: held-back labels, or -1).

        Args:
            split: The job's split (its ``unlabeled`` rows, when the pool comes from the
                labeled listing).
            extra: Per-pool-image arrays (e.g. teacher labels), aligned with the pool's
                order; joined on the row index inside the Ray Data tasks.
        """
        from jobs.ingest import IngestStats, image_dataset

        table, rows, labels = self._pool_rows(split)
        if len(rows) == 0:
            raise DatasetError("the unlabeled pool is empty (data.unlabeled: 0, or an empty unlabeled_source)")
        stats = IngestStats.create()  # corrupt pool files are dropped while streaming, and counted here
        # A seeded permutation mixes classes across blocks (listings are in folder order); the
        # blocks are reordered every pass, so a small local shuffle buffer suffices.
        shuffled = rows[np.random.default_rng(split.seed).permutation(len(rows))]
        ds = image_dataset(table, self.image_size, channels=self.channels, rows=shuffled, stats=stats)
        ds = ds.randomize_block_order()
        position = np.full(table.num_rows, -1, dtype=np.int64)
        position[rows] = np.arange(len(rows))
        columns: dict[str, np.ndarray] = {}
        if held_back_labels:
            columns["y"] = labels[rows] if labels is not None else np.full(len(rows), NO_LABEL, np.int64)
        columns.update(extra or {})
        for key, value in columns.items():
            if len(value) != len(rows):
                raise ValueError(f"pool column {key!r} has {len(value)} rows, the pool {len(rows)}")
        joiner = _JoinColumns(position, columns)
        ds = ds.map_batches(joiner, batch_format="numpy", num_cpus=0.25)
        source = (self.pool_table is not None and "unlabeled_source") or "labeled listing"
        return StreamedSplit(ds, len(rows), ("x", *columns), info={"source": source, "ingest_stats": stats})


class _Renumber:
    """Map a table's row numbers to positions ``0..N-1`` in the pool."""

    def __init__(self, position: np.ndarray) -> None:
        self.position = position

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        return {"row": self.position[batch["row"]], "image": batch["image"]}


class _JoinColumns:
    """Map ``{"row", "image"}`` batches to ``{"x", <columns>...}`` by the row's position in the pool."""

    def __init__(self, position: np.ndarray, columns: dict[str, np.ndarray]) -> None:
        self.position, self.columns = position, columns

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        at = self.position[batch["row"]]
        out = {"x": batch["image"]}
        for key, value in self.columns.items():
            out[key] = value[at]
        return out


def load_source_data(data: DataConfig, seed: int, image_size: int, *, channels: int = 3,
                     run_dir: Path | None = None) -> tuple[SourceDataset, Split]:
    """List the sources, draw the split from labels alone, decode nothing but what the split needs.

    Args:
        data: The job's ``data:`` section (``imagefolder:``/``manifest:`` dataset,
            optional ``unlabeled_source``).
        seed: Split seed.
        image_size: Decode size (``data.image_size``, else the backbone's input size).
        channels: 3 (RGB) or 1.
        run_dir: If given, the split is written there as ``split.parquet``.

    Raises:
        DatasetError: Empty sources, or a subset that keeps failing to decode.
    """
    kind = data.dataset.partition(":")[0]
    if kind not in {"imagefolder", "manifest"}:
        raise DatasetError(f"data.unlabeled_source needs a source dataset (imagefolder:<uri> or manifest:<uri>), "
                           f"not {data.dataset!r}: the labeled images must come from files too")
    table = open_source(data.dataset, labeled=True)
    if table.num_rows == 0:
        raise DatasetError(f"{data.dataset}: no images")
    pool_table = open_source(data.unlabeled_source, labeled=False) if data.unlabeled_source else None
    if pool_table is not None and pool_table.num_rows == 0:
        raise DatasetError(f"data.unlabeled_source {data.unlabeled_source}: no images")
    skipped: list[tuple[str, str]] = []
    for _ in range(MAX_REDRAWS):
        class_names = class_names_of(table)
        labels = np.asarray([class_names.index(v) for v in table.column("label").to_pylist()], dtype=np.int64)
        split = make_split(labels, class_names, labels_per_class=data.labels_per_class, seed=seed,
                           val_per_class=data.val_per_class,
                           unlabeled=0 if pool_table is not None else data.unlabeled, test_limit=data.test_limit)
        images = DecodedImages(table, image_size, channels, table.num_rows)
        images.decode(np.concatenate([split.labeled, split.val, split.test]))
        if not images.failed:
            break
        # Drop the unreadable files from the listing and draw again: the split depends on readable files only.
        paths = table.column("path").to_pylist()
        for row, reason in sorted(images.failed.items()):
            skipped.append((paths[row], reason))
            logger.warning("skipping unreadable image %s (%s)", paths[row], reason)
        keep = np.setdiff1d(np.arange(table.num_rows), np.fromiter(images.failed, np.int64))
        table = table.take(pa.array(keep))
    else:
        raise DatasetError(f"{data.dataset}: decoded subsets still held corrupt files after {MAX_REDRAWS} "
                           f"redraws ({len(skipped)} skipped); check the source")
    digest = fingerprint(table) + (fingerprint(pool_table) if pool_table is not None else "")
    dataset = SourceDataset(
        spec=data.dataset, class_names=class_names, train=SourcePool(images, labels),  # type: ignore[arg-type]
        test=None, skipped=skipped, table=table, pool_table=pool_table, image_size=image_size, channels=channels,
        source_fingerprint=_short(digest),
    )
    if run_dir is not None:
        assignments = {"labeled": split.labeled, "val": split.val, "test": split.test}
        if pool_table is None:
            assignments["unlabeled"] = split.unlabeled
        write_split_manifest(run_dir / "split.parquet", table, assignments)
    logger.info("%s: %d listed images (%d classes), pool %s; split drawn from labels alone", data.dataset,
                table.num_rows, len(class_names),
                f"{pool_table.num_rows} images from {data.unlabeled_source}" if pool_table is not None
                else f"{len(split.unlabeled)} images from the labeled listing")
    return dataset, split


def _short(digest: str) -> str:
    import hashlib

    return hashlib.sha256(digest.encode()).hexdigest()
