"""Images into Ray Data: decoding in tasks across the cluster, never on the driver.

:func:`image_dataset` turns a source table (``polyclip.data.sources``: one row per file,
no pixels) into a Ray Dataset of decoded images. The table is cut into small Arrow
blocks of paths; each Ray Data task reads its files' bytes through pyarrow (local, NFS,
S3, fsspec), decodes them with :func:`polyclip.data.images.decode_image` and emits
``{"row", "image"[, "label"]}``. Ray Data's streaming executor keeps only a bounded
window of decoded blocks alive, so neither the driver nor any worker holds the pool.

A file that cannot be read or decoded is dropped from the stream and recorded in an
:class:`IngestStats` actor (path and reason); the job reads the counts after iterating
and puts them in its metrics. With ``strict=True`` the first bad file fails the dataset.

:func:`dataset_from_arrays` gives in-memory datasets (Fashion-MNIST, synthetic) the same
row schema, in blocks.

Example:
    >>> from polyclip.data.sources import list_images            # doctest: +SKIP
    >>> table = list_images("s3://photos/pool", labeled=False)
    >>> stats = IngestStats.create()
    >>> ds = image_dataset(table, 224, stats=stats)
    >>> for batch in ds.iter_batches(batch_size=256): ...
    >>> stats.summary()["skipped"]
"""

from __future__ import annotations

import functools
import logging
import math
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from polyclip.data.images import ImageDecodeError, decode_image
from polyclip.data.sources import S3Options, SourceError, open_file

if TYPE_CHECKING:
    import ray.actor
    import ray.data

logger = logging.getLogger("polyclip.ingest")

#: Paths per Ray Data block: small tables still spread over many tasks, a 10M-image pool
#: makes ~10k blocks of 1024 paths.
MIN_BLOCK_ROWS, MAX_BLOCK_ROWS, TARGET_BLOCKS = 16, 1024, 200
#: Images per decoded output block: a 1024-path block at 224 px would make one 150 MB
#: output; batches of 128 (~19 MB) stream out of the task as they are decoded.
DECODE_BATCH = 128
#: Files each decode task reads at once (I/O bound on object stores; decoding stays serial).
READ_THREADS = 8
#: Skipped paths kept for the report (the counts cover all of them).
KEEP_PATHS = 1000


# --------------------------------------------------------------------------- skipped-file stats


@functools.cache
def _stats_actor_class() -> Any:
    import ray

    @ray.remote(num_cpus=0, max_restarts=0)
    class IngestStatsActor:
        """Counts of files dropped by decode tasks, by reason, and the first paths."""

        def __init__(self, keep: int) -> None:
            self.keep = keep
            self.by_reason: dict[str, int] = {}
            self.paths: list[dict[str, str]] = []

        def record(self, failures: list[tuple[str, str, str]]) -> None:
            for path, reason, message in failures:
                self.by_reason[reason] = self.by_reason.get(reason, 0) + 1
                if len(self.paths) < self.keep:
                    self.paths.append({"path": path, "reason": reason, "error": message})

        def summary(self) -> dict[str, Any]:
            return {
                "skipped": sum(self.by_reason.values()),
                "by_reason": dict(sorted(self.by_reason.items())),
                "paths": list(self.paths),
            }

    return IngestStatsActor


class IngestStats:
    """Handle on a small actor (no CPU) that counts files dropped while decoding.

    Create it on the driver, pass it to :func:`image_dataset`, read :meth:`summary` after
    the dataset has been iterated (the counts cover what was decoded so far). The
    handle pickles, so it can also be passed to Train workers.
    """

    def __init__(self, actor: ray.actor.ActorHandle) -> None:
        self.actor = actor

    @classmethod
    def create(cls, *, keep_paths: int = KEEP_PATHS) -> IngestStats:
        """Start the counting actor (needs a connected Ray)."""
        return cls(_stats_actor_class().remote(keep_paths))

    def record(self, failures: list[tuple[str, str, str]]) -> None:
        """Record ``(path, reason, message)`` triples; waits, so a finished task's failures are counted."""
        import ray

        ray.get(self.actor.record.remote(failures))

    def summary(self) -> dict[str, Any]:
        """``{"skipped": n, "by_reason": {reason: n}, "paths": [{"path", "reason", "error"}, ...]}``."""
        import ray

        summary: Any = ray.get(self.actor.summary.remote())
        return summary


# --------------------------------------------------------------------------- decode tasks


def _empty_batch(image_size: int, channels: int, with_label: bool) -> dict[str, np.ndarray]:
    batch: dict[str, np.ndarray] = {
        "row": np.zeros(0, dtype=np.int64),
        "image": np.zeros((0, channels, image_size, image_size), dtype=np.uint8),
    }
    if with_label:
        batch["label"] = np.zeros(0, dtype=np.int64)
    return batch


class _DecodeBatch:
    """The Ray Data UDF: paths in, decoded images out; bad files recorded, not raised."""

    def __init__(
        self,
        image_size: int,
        channels: int,
        s3: S3Options,
        stats: IngestStats | None,
        strict: bool,
        max_pixels: int,
        keep_failed: bool = False,
    ) -> None:
        self.keep_failed = keep_failed
        self.image_size = image_size
        self.channels = channels
        self.s3 = s3
        self.stats = stats
        self.strict = strict
        self.max_pixels = max_pixels

    def _read(self, path: str) -> bytes | ImageDecodeError:
        try:
            return open_file(path, s3=self.s3)
        except OSError as exc:
            return ImageDecodeError(f"unreadable: {exc}", "unreadable")

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        paths = [str(p) for p in batch["path"]]
        keep: list[int] = []
        images: list[np.ndarray] = []
        failures: list[tuple[str, str, str]] = []
        with ThreadPoolExecutor(max_workers=min(READ_THREADS, max(1, len(paths)))) as pool:
            for i, (path, data) in enumerate(zip(paths, pool.map(self._read, paths))):
                try:
                    if isinstance(data, ImageDecodeError):
                        raise data
                    images.append(decode_image(data, self.image_size, channels=self.channels,
                                               max_pixels=self.max_pixels))
                    keep.append(i)
                except ImageDecodeError as exc:
                    if self.strict:
                        raise ImageDecodeError(f"{path}: {exc}", exc.reason) from exc
                    failures.append((path, exc.reason, str(exc)))
                    if self.keep_failed:  # a black image keeps the row (features need every row)
                        images.append(np.zeros((self.channels, self.image_size, self.image_size), np.uint8))
                        keep.append(i)
        if failures:
            for path, _, message in failures:
                logger.warning("skipping %s: %s", path, message)
            if self.stats is not None:
                self.stats.record(failures)
        with_label = "label" in batch
        if not keep:
            return _empty_batch(self.image_size, self.channels, with_label)
        index = np.asarray(keep)
        out = {"row": np.asarray(batch["row"], dtype=np.int64)[index], "image": np.stack(images)}
        if with_label:
            out["label"] = np.asarray(batch["label"], dtype=np.int64)[index]
        return out


def _block_rows(num_rows: int) -> int:
    return int(min(MAX_BLOCK_ROWS, max(MIN_BLOCK_ROWS, math.ceil(num_rows / TARGET_BLOCKS))))


def _label_indices(labels: pa.ChunkedArray, rows: np.ndarray, class_names: Sequence[str]) -> np.ndarray:
    found = pc.index_in(labels, value_set=pa.array(list(class_names), pa.string()))
    bad = np.flatnonzero(pc.is_null(found).to_numpy(zero_copy_only=False))
    if len(bad):
        shown = ", ".join(f"row {int(rows[i])}: {labels[int(i)].as_py()!r}" for i in bad[:10])
        raise SourceError(f"{len(bad)} rows have a label outside the classes {list(class_names)}: {shown}")
    return pc.fill_null(found, -1).to_numpy(zero_copy_only=False).astype(np.int64)


def image_dataset(
    table: pa.Table,
    image_size: int,
    *,
    channels: int = 3,
    rows: np.ndarray | None = None,
    class_names: Sequence[str] | None = None,
    stats: IngestStats | None = None,
    strict: bool = False,
    s3: S3Options | None = None,
    num_cpus: float = 0.5,
    max_pixels: int = 40_000_000,
    keep_failed: bool = False,
) -> ray.data.Dataset:
    """A Ray Dataset of decoded images from a source table, decoded in Ray Data tasks.

    Args:
        table: A source table (``path``, ``label``, ...), e.g. from
            :func:`polyclip.data.sources.open_source`.
        image_size: Output side length (shorter side resized, centre crop).
        channels: 3 (RGB) or 1 (grayscale).
        rows: Indices of the table rows to decode (default: all), e.g. one subset of a split.
        class_names: When given, each row's ``label`` string becomes an ``int64`` class
            index in a ``label`` column.
        stats: Where dropped files are counted; see :class:`IngestStats`.
        strict: Fail on the first unreadable or corrupt file instead of dropping it.
        s3: S3 options shipped to the tasks; default read from the driver's environment
            (worker processes may not share it).
        num_cpus: CPUs per decode task; fractional so decoding overlaps with I/O and
            leaves room for consumers on small machines.
        max_pixels: Decompression-bomb limit per image.
        keep_failed: Keep a file that fails to decode as an all-black image (still
            counted in ``stats``) instead of dropping its row: for encoders that need a
            feature for every row (the feature store); training streams drop them.

    Returns:
        A lazy dataset with rows ``{"row": int64, "image": uint8 (C, H, W)}`` plus
        ``"label": int64`` when ``class_names`` is given. Row order is not preserved;
        ``row`` says which table row each image came from.

    Raises:
        SourceError: The table lacks a ``path`` column, ``rows`` is out of range, or a
            label is outside ``class_names``.
    """
    import ray

    if "path" not in table.column_names:
        raise SourceError(f"source table has no 'path' column; it has {table.column_names}")
    if channels not in (1, 3):
        raise ValueError(f"channels must be 1 or 3, got {channels}")
    index = np.arange(table.num_rows, dtype=np.int64) if rows is None else np.asarray(rows, dtype=np.int64)
    if len(index) and (index.min() < 0 or index.max() >= table.num_rows):
        outside = index[(index < 0) | (index >= table.num_rows)]
        raise SourceError(f"{len(outside)} rows outside 0..{table.num_rows - 1}, e.g. {outside[:10].tolist()}")
    columns: dict[str, pa.Array] = {
        "row": pa.array(index, pa.int64()),
        "path": table.column("path").take(pa.array(index)).combine_chunks(),
    }
    if class_names is not None:
        if "label" not in table.column_names:
            raise SourceError("class_names given but the source table has no 'label' column")
        labels = table.column("label").take(pa.array(index))
        columns["label"] = pa.array(_label_indices(labels, index, class_names), pa.int64())
    paths = pa.table(columns)
    step = _block_rows(len(index))
    # take() copies, so each block ships only its own rows (a slice would ship the buffers).
    blocks = [paths.take(pa.array(np.arange(s, min(s + step, len(index))))) for s in range(0, len(index), step)]
    if not blocks:
        blocks = [paths]
    decode = _DecodeBatch(image_size, channels, s3 or S3Options.from_env(), stats, strict, max_pixels, keep_failed)
    return ray.data.from_arrow(blocks).map_batches(
        decode, batch_size=min(step, DECODE_BATCH), batch_format="numpy", num_cpus=num_cpus, zero_copy_batch=True
    )


def dataset_from_arrays(
    x: np.ndarray, y: np.ndarray | None = None, *, rows: np.ndarray | None = None, block_rows: int = 4096
) -> ray.data.Dataset:
    """An in-memory image array (Fashion-MNIST, synthetic) as a Ray Dataset, in blocks.

    Args:
        x: ``uint8`` images ``(N, C, H, W)``.
        y: ``int64`` labels ``(N,)``, or None.
        rows: Indices of ``x`` to include (default: all); kept in the ``row`` column.
        block_rows: Images per block (each block is one object in the object store).

    Returns:
        Rows ``{"row": int64, "image": uint8 (C, H, W)}`` and ``"label": int64`` when ``y``
        is given: the schema of :func:`image_dataset`.
    """
    import ray
    from ray.data.extensions import ArrowTensorArray

    if x.ndim != 4:
        raise ValueError(f"images must be (N, C, H, W), got shape {x.shape}")
    if y is not None and len(y) != len(x):
        raise ValueError(f"{len(x)} images but {len(y)} labels")
    index = np.arange(len(x), dtype=np.int64) if rows is None else np.asarray(rows, dtype=np.int64)
    blocks = []
    for start in range(0, max(1, len(index)), block_rows):
        part = index[start : start + block_rows]
        columns: dict[str, Any] = {
            "row": pa.array(part, pa.int64()),
            "image": ArrowTensorArray.from_numpy(np.ascontiguousarray(x[part], dtype=np.uint8)),
        }
        if y is not None:
            columns["label"] = pa.array(np.asarray(y)[part], pa.int64())
        blocks.append(pa.table(columns))
    return ray.data.from_arrow(blocks)
