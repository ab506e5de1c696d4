"""Seeded, sharded mini-batch streams over in-memory arrays.

Few-label datasets live in memory, so a plain index permutation beats a DataLoader
with worker processes (which would compete with DDP workers for the same cores).
Every rank permutes with the same seed and takes a disjoint shard, exactly like
``DistributedSampler``, so the global batch is ``batch_size * world_size`` and adding
workers neither repeats nor drops examples.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping

import numpy as np
import torch


class ArrayLoader:
    """Mini-batches of aligned arrays, shuffled per epoch and sharded per rank.

    Args:
        arrays: Arrays of equal length (``"x"``, ``"y"``, ...).
        batch_size: Per-rank batch size.
        shuffle: Reshuffle every epoch (seeded by ``seed + epoch``).
        seed: Base seed; identical on every rank.
        rank: This worker's rank.
        world_size: Number of workers.
        drop_last: Drop the last incomplete batch.
    """

    def __init__(self, arrays: Mapping[str, np.ndarray], batch_size: int, *, shuffle: bool = True,
                 seed: int = 0, rank: int = 0, world_size: int = 1, drop_last: bool = False) -> None:
        lengths = {k: len(v) for k, v in arrays.items()}
        if len(set(lengths.values())) != 1:
            raise ValueError(f"arrays differ in length: {lengths}")
        self.arrays = dict(arrays)
        self.n = next(iter(lengths.values()))
        if self.n == 0:
            raise ValueError("cannot stream an empty split")
        self.batch_size, self.shuffle, self.seed = batch_size, shuffle, seed
        self.rank, self.world_size, self.drop_last = rank, world_size, drop_last
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def _indices(self) -> np.ndarray:
        order = np.random.default_rng(self.seed + self.epoch).permutation(self.n) if self.shuffle else np.arange(self.n)
        # Pad so every rank gets the same number of examples (as DistributedSampler does).
        per_rank = -(-self.n // self.world_size)
        if per_rank * self.world_size > self.n:
            order = np.concatenate([order, order[: per_rank * self.world_size - self.n]])
        return order[self.rank :: self.world_size]

    def __len__(self) -> int:
        per_rank = -(-self.n // self.world_size)
        return per_rank // self.batch_size if self.drop_last else -(-per_rank // self.batch_size)

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        idx = self._indices()
        for start in range(0, len(idx), self.batch_size):
            chunk = idx[start : start + self.batch_size]
            if self.drop_last and len(chunk) < self.batch_size:
                return
            yield {k: torch.from_numpy(np.ascontiguousarray(v[chunk])) for k, v in self.arrays.items()}

    def forever(self) -> Iterator[dict[str, torch.Tensor]]:
        """Cycle epochs without end (for secondary streams)."""
        while True:
            yield from self
            self.epoch += 1
