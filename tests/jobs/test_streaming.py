"""Streamed training data: Ray Datasets built block by block, shards that give every worker the same steps."""

from __future__ import annotations

import threading

import numpy as np
import pytest
import torch

from jobs.recipes.base import Payload, Streamed
from jobs.streaming import STREAM_THRESHOLD, ShardStream, StreamedSplit, arrays_to_dataset, split_streamed


def test_arrays_become_a_dataset_of_blocks(ray_cluster):
    x = np.arange(5000 * 3, dtype=np.uint8).reshape(5000, 3)
    y = np.arange(5000, dtype=np.int64)
    ds = arrays_to_dataset({"x": x, "y": y}, block_rows=1024)
    assert ds.count() == 5000
    assert len(ds.get_internal_block_refs()) == 5  # one object per block, none holding the whole split
    rows = ds.take(2)
    assert rows[1]["y"] == 1 and np.array_equal(rows[1]["x"], x[1])


def test_the_pool_always_streams_and_large_labeled_splits_too(ray_cluster):
    small = {"x": np.zeros((10, 1, 2, 2), np.uint8), "y": np.zeros(10, np.int64)}
    payload = Payload(train=dict(small), val=dict(small), test=dict(small),
                      unlabeled={"x": np.zeros((300, 1, 2, 2), np.uint8)})
    streamed = split_streamed(payload, {"train", "unlabeled"})
    assert set(streamed) == {"unlabeled"}
    assert payload.unlabeled == Streamed(300) and "x" in payload.train
    assert streamed["unlabeled"].columns == ("x",) and streamed["unlabeled"].num_rows == 300
    big = Payload(train={"x": np.zeros((STREAM_THRESHOLD + 1, 2), np.float32),
                         "y": np.zeros(STREAM_THRESHOLD + 1, np.int64)}, val=dict(small), test=dict(small))
    assert set(split_streamed(big, {"train"})) == {"train"}
    # Tasks still size their first layer from the streamed split's shape.
    assert big.train == Streamed(STREAM_THRESHOLD + 1) and big.input_shape == (2,)
    with pytest.raises(TypeError, match="'train' is streamed"):
        big.arrays("train")


def test_mismatched_or_empty_arrays_are_refused(ray_cluster):
    with pytest.raises(ValueError, match="differ in length"):
        arrays_to_dataset({"x": np.zeros(3), "y": np.zeros(4)})
    with pytest.raises(ValueError, match="empty split"):
        arrays_to_dataset({"x": np.zeros(0)})


def test_shards_give_every_worker_the_same_steps_and_cover_the_pool(ray_cluster):
    """Two workers on an equal split of 1,000 rows: each takes 3 passes' worth of steps from an endless stream,
    every pass of a worker yields the same number of full batches, and one pass of both covers each row once."""
    n, batch = 1000, 64
    ds = arrays_to_dataset({"x": np.arange(n, dtype=np.int64)}, block_rows=100)
    shards = ds.streaming_split(2, equal=True)
    seen: dict[int, list[torch.Tensor]] = {0: [], 1: []}
    per_pass = (n // 2) // batch

    def consume(rank: int) -> None:
        stream = ShardStream("unlabeled", batch, n // 2, ("x",), shuffle_buffer=200, seed=rank, shard=shards[rank])
        assert len(stream) == per_pass
        batches = stream.forever()
        for _ in range(3 * per_pass):
            seen[rank].append(next(batches)["x"])

    threads = [threading.Thread(target=consume, args=(rank,)) for rank in (0, 1)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert all(len(seen[r]) == 3 * per_pass for r in (0, 1))
    assert all(b.shape == (batch,) for r in (0, 1) for b in seen[r])
    first_pass = torch.cat([torch.cat(seen[r][:per_pass]) for r in (0, 1)])
    assert len(first_pass.unique()) == len(first_pass)  # no row twice within a pass
    assert not torch.equal(seen[0][0], torch.sort(seen[0][0]).values)  # the local buffer shuffled


def test_a_shard_smaller_than_a_batch_fails_clearly():
    with pytest.raises(ValueError, match="fewer than one batch of 64"):
        ShardStream("unlabeled", 64, 10, ("x",), shard=object())


def test_streamed_split_is_plain_data():
    split = StreamedSplit(dataset=None, num_rows=3, columns=("x",))
    assert split.info == {}


def test_streamed_arrays_are_permuted_with_their_columns_aligned(ray_cluster):
    """A split in class order streams in a seeded random order; every row keeps its own label and extras."""
    from jobs.streaming import stream_split

    x = np.arange(600, dtype=np.int64)
    split = stream_split({"x": x, "y": x // 200, "teacher": x * 10}, seed=3)
    rows = split.dataset.take_all()
    first = [int(r["x"]) for r in rows[:50]]
    assert len({v // 200 for v in first}) == 3  # the first rows already mix the three "classes"
    assert all(int(r["y"]) == int(r["x"]) // 200 and int(r["teacher"]) == 10 * int(r["x"]) for r in rows)
    assert sorted(int(r["x"]) for r in rows) == list(range(600))
