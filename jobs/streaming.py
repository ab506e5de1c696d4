"""Training data that reaches the Ray Train workers as Ray Datasets, not as a ``ray.put`` payload.

The driver keeps only what is small (the few labeled images, validation and test sets)
as arrays; the unlabeled pool, and any labeled split larger than
:data:`STREAM_THRESHOLD` rows, travel as Ray Datasets that each worker reads from its own
shard (``ray.train.get_dataset_shard``) with a local shuffle buffer and prefetching. The
pool never passes through the driver's heap as one array, and no worker holds more than
its prefetch window.

:class:`StreamedSplit` is what a recipe puts in its payload instead of an array dict;
:class:`ShardStream` is the worker side, a :class:`polyclip.engine.fit.Stream`.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

logger = logging.getLogger("polyclip")

#: Labeled splits with more rows than this are streamed too (the pool always is).
STREAM_THRESHOLD = 50_000
#: Rows per block when arrays become a Ray Dataset (about 2-40 MB of images per block).
BLOCK_ROWS = 2048


@dataclass
class StreamedSplit:
    """A split that reaches the workers as a Ray Dataset.

    Attributes:
        dataset: Rows whose columns are the stream's batch keys (``x``, ``y``...).
        num_rows: Rows in the dataset (known on the driver without reading it).
        columns: Columns the task receives (others, e.g. a ``row`` index, are dropped).
        info: Small per-split facts for the report (e.g. corrupt files skipped).
    """

    dataset: Any
    num_rows: int
    columns: tuple[str, ...]
    info: dict[str, Any] = field(default_factory=dict)


def filter_min(split: StreamedSplit, column: str, minimum: float, kept: int) -> StreamedSplit:
    """Keep the rows of a streamed split whose ``column`` is at least ``minimum`` (``kept`` of them)."""
    return StreamedSplit(split.dataset.map_batches(_FilterMin(column, minimum), batch_format="numpy", num_cpus=0.25),
                         kept, split.columns, dict(split.info))


def with_arrays(split: StreamedSplit, arrays: Mapping[str, np.ndarray]) -> StreamedSplit:
    """A streamed split plus in-memory rows (e.g. SimCLR's labeled images added to the pool); same columns."""
    missing = set(split.columns) - set(arrays)
    if missing:
        raise ValueError(f"rows added to a streamed split lack its columns {sorted(missing)}")
    extra = arrays_to_dataset({key: arrays[key] for key in split.columns})
    return StreamedSplit(split.dataset.union(extra), split.num_rows + _rows(arrays), split.columns, dict(split.info))


class _FilterMin:
    def __init__(self, column: str, minimum: float) -> None:
        self.column, self.minimum = column, minimum

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        keep = batch[self.column] >= self.minimum
        return {key: value[keep] for key, value in batch.items()}


def arrays_to_dataset(arrays: Mapping[str, np.ndarray], block_rows: int = BLOCK_ROWS) -> Any:
    """A Ray Dataset over aligned in-memory arrays, built block by block (one object per block).

    For data that is already in memory (Fashion-MNIST, teacher labels): each block goes
    to the object store on its own, so no single object holds the whole split.
    """
    import pyarrow as pa
    import ray.data
    from ray.data.extensions import ArrowTensorArray

    lengths = {k: len(v) for k, v in arrays.items()}
    if len(set(lengths.values())) != 1:
        raise ValueError(f"arrays differ in length: {lengths}")
    n = next(iter(lengths.values()))
    if n == 0:
        raise ValueError("cannot stream an empty split")
    blocks = []
    for start in range(0, n, block_rows):
        columns = {}
        for key, value in arrays.items():
            chunk = np.ascontiguousarray(value[start : start + block_rows])
            columns[key] = ArrowTensorArray.from_numpy(chunk) if chunk.ndim > 1 else pa.array(chunk)
        blocks.append(ray.put(pa.table(columns)))
    return ray.data.from_arrow_refs(blocks)


def stream_split(arrays: Mapping[str, np.ndarray], seed: int = 0) -> StreamedSplit:
    """Arrays of a split, as a :class:`StreamedSplit` in a seeded random order, blocks reordered every pass.

    The permutation mixes classes across blocks (a split in class or file order would
    otherwise give one-class batches), so a small local shuffle buffer suffices.
    """
    n = len(next(iter(arrays.values())))
    order = np.random.default_rng(seed).permutation(n)
    dataset = arrays_to_dataset({key: value[order] for key, value in arrays.items()})
    return StreamedSplit(dataset.randomize_block_order(), n, tuple(arrays))


def split_streamed(payload: Any, stream_keys: set[str], seed: int = 0) -> dict[str, StreamedSplit]:
    """Take the streamed splits out of a recipe's payload (in place): the pool always, large labeled splits too.

    Args:
        payload: The recipe's ``jobs.recipes.base.Payload``; splits that must stream are
            replaced by a ``Streamed`` row count (workers size their streams from it).
        stream_keys: Payload splits the recipe streams (the values of ``recipe.streams``).
    """
    from jobs.recipes.base import Streamed

    streamed: dict[str, StreamedSplit] = {}
    for key in sorted(stream_keys):
        value = payload.split(key)
        if isinstance(value, StreamedSplit):
            streamed[key] = value
        elif isinstance(value, dict) and (key == "unlabeled" or _rows(value) > STREAM_THRESHOLD):
            streamed[key] = stream_split(value, seed)
        else:
            continue
        payload.set_split(key, Streamed(streamed[key].num_rows))
    return streamed


def _rows(arrays: Mapping[str, np.ndarray]) -> int:
    return len(next(iter(arrays.values()))) if arrays else 0


class ShardStream:
    """One worker's shard of a streamed split, as an endless stream of fixed-size batches.

    Every worker reads the same number of rows (Ray Train splits datasets with
    ``equal=True``) and the fit loop takes the same number of steps on every worker, so
    no collective waits for a worker that ran out of data.

    Args:
        name: The dataset's name in ``TorchTrainer(datasets=...)``.
        batch_size: Rows per batch on this worker.
        rows_per_worker: Rows in this worker's shard (for ``len``).
        columns: Batch keys to keep.
        shuffle_buffer: Rows in the local shuffle buffer (0: no shuffling).
        prefetch_batches: Batches prefetched in the background.
        seed: Seeds the local shuffle (per worker and pass).
        pin_memory: Pin host memory before the copy to a GPU.
    """

    def __init__(self, name: str, batch_size: int, rows_per_worker: int, columns: tuple[str, ...], *,
                 shuffle_buffer: int = 256, prefetch_batches: int = 2, seed: int = 0,
                 pin_memory: bool = False, shard: Any = None) -> None:
        if rows_per_worker < batch_size:
            raise ValueError(f"streamed split {name!r} has {rows_per_worker} rows per worker, fewer than one batch "
                             f"of {batch_size}; lower train.batch_size or the batch multiplier, or use fewer workers")
        if shard is None:
            import ray.train

            shard = ray.train.get_dataset_shard(name)
        self.name, self.batch_size, self.columns = name, batch_size, columns
        self.rows_per_worker, self.shuffle_buffer = rows_per_worker, shuffle_buffer
        self.prefetch_batches, self.seed, self.pin_memory = prefetch_batches, seed, pin_memory
        self.shard = shard
        self.passes = 0
        self._batches: Iterator[dict[str, torch.Tensor]] | None = None

    def __len__(self) -> int:
        return self.rows_per_worker // self.batch_size

    def set_epoch(self, epoch: int) -> None:
        """Streams continue where they stopped: an epoch boundary is not a pass boundary."""

    def forever(self) -> Iterator[dict[str, torch.Tensor]]:
        if self._batches is None:
            self._batches = self._cycle()
        return self._batches

    def _cycle(self) -> Iterator[dict[str, torch.Tensor]]:
        while True:
            count = 0
            for batch in self.shard.iter_torch_batches(
                batch_size=self.batch_size, drop_last=True, device="cpu",
                local_shuffle_buffer_size=self.shuffle_buffer or None,
                local_shuffle_seed=(self.seed + self.passes) if self.shuffle_buffer else None,
                prefetch_batches=self.prefetch_batches, pin_memory=self.pin_memory,
            ):
                count += 1
                yield {key: batch[key] for key in self.columns}
            self.passes += 1
            if count == 0:
                raise RuntimeError(f"streamed split {self.name!r} yielded no full batch of {self.batch_size} rows")
