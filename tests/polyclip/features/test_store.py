"""The sharded feature store: round trip, resume, damaged shards, object-store code path."""

from __future__ import annotations

import json
import logging

import numpy as np
import pytest

from polyclip.features.store import FeatureStore, ShardError, filesystem_for


def _features(n: int, dim: int = 5, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).normal(size=(n, dim)).astype(np.float32)


class CountingEncoder:
    """Stands in for a backbone: row ``i`` encodes to ``reference[i]``; counts calls and rows."""

    def __init__(self, reference: np.ndarray, fail_after: int | None = None) -> None:
        self.reference, self.fail_after = reference, fail_after
        self.calls: list[tuple[int, int]] = []

    def __call__(self, start: int, stop: int) -> np.ndarray:
        if self.fail_after is not None and len(self.calls) >= self.fail_after:
            raise KeyboardInterrupt("killed")  # the job dies mid-encode
        self.calls.append((start, stop))
        return self.reference[start:stop]


def test_sharded_round_trip_and_index(tmp_path):
    store = FeatureStore(tmp_path, shard_rows=4)
    feats = _features(10)
    entry = store.write_array("k", feats, {"backbone": "x", "pool": "train"})
    assert (entry.num_rows, entry.dim, entry.dtype) == (10, 5, np.float32)
    assert sorted(p.name for p in (tmp_path / "k").glob("part-*.npy")) == [
        "part-00000.npy", "part-00001.npy", "part-00002.npy"]
    index = json.loads((tmp_path / "k" / "index.json").read_text())
    assert [s["rows"] for s in index["shards"]] == [4, 4, 2]
    assert all(len(s["sha256"]) == 64 for s in index["shards"])
    assert (index["dim"], index["dtype"], index["description"]["backbone"]) == (5, "float32", "x")

    reopened = store.open("k")
    assert reopened is not None and np.array_equal(reopened.to_numpy(), feats)
    rows = np.array([9, 0, 4, 4, 3])
    assert np.array_equal(reopened.to_numpy(rows), feats[rows])
    batches = list(reopened.iter_batches(3))  # batches cross shard boundaries
    assert [len(b["row"]) for b in batches] == [3, 3, 3, 1]
    assert np.array_equal(np.concatenate([b["row"] for b in batches]), np.arange(10))
    assert np.array_equal(np.concatenate([b["features"] for b in batches]), feats)
    assert store.open("absent") is None


def test_resume_after_interruption_encodes_only_missing_shards(tmp_path):
    store = FeatureStore(tmp_path, shard_rows=4)
    feats = _features(10)
    killed = CountingEncoder(feats, fail_after=2)
    with pytest.raises(KeyboardInterrupt):
        store.encode("k", {"backbone": "x"}, 10, killed)
    assert killed.calls == [(0, 4), (4, 8)]
    assert store.open("k") is None  # no index until every shard is in

    resumed = CountingEncoder(feats)
    entry = store.encode("k", {"backbone": "x"}, 10, resumed)
    assert resumed.calls == [(8, 10)]  # the two finished shards are kept
    assert np.array_equal(entry.to_numpy(), feats)

    again = CountingEncoder(feats)
    store.encode("k", {"backbone": "x"}, 10, again)
    assert again.calls == []


@pytest.mark.parametrize("damage", ["zero_byte", "truncated", "flipped_byte"])
def test_damaged_shard_is_detected_and_reencoded(tmp_path, caplog, damage):
    store = FeatureStore(tmp_path, shard_rows=4)
    feats = _features(10)
    store.write_array("k", feats, {})
    shard = tmp_path / "k" / "part-00001.npy"
    data = shard.read_bytes()
    if damage == "zero_byte":
        shard.write_bytes(b"")
    elif damage == "truncated":
        shard.write_bytes(data[: len(data) // 2])
    else:  # same size, one bit flipped in the features: only the checksum sees it
        shard.write_bytes(data[:-3] + bytes([data[-3] ^ 1]) + data[-2:])

    with caplog.at_level(logging.WARNING):
        entry = store.open("k")
        if entry is not None:  # a same-size change passes the cheap check, not the read
            assert damage == "flipped_byte"
            with pytest.raises(ShardError, match=r"part-00001\.npy.*checksum"):
                entry.to_numpy()
        counter = CountingEncoder(feats)
        repaired = store.encode("k", {}, 10, counter)
    assert counter.calls == [(4, 8)]
    assert np.array_equal(repaired.to_numpy(), feats)
    assert any("part-00001.npy" in r.getMessage() for r in caplog.records if r.levelno == logging.WARNING)


def test_bad_input_is_refused_with_the_value(tmp_path):
    store = FeatureStore(tmp_path, shard_rows=4)
    entry = store.write_array("k", _features(6), {})
    with pytest.raises(ValueError, match="row 6 "):
        entry.to_numpy(np.array([0, 6]))
    with pytest.raises(ValueError, match="max_bytes"):
        entry.to_numpy(max_bytes=10)
    with pytest.raises(ValueError, match="'a/b'"):
        store.open("a/b")
    writer = store.writer("w", {}, 6)
    with pytest.raises(ValueError, match=r"shard 0 of w needs \(4, dim\)"):
        writer.write_shard(0, _features(3))
    with pytest.raises(ValueError, match="non-finite"):
        writer.write_shard(1, np.full((2, 5), np.nan, dtype=np.float32))
    with pytest.raises(ValueError, match=r"shards \[0, 1\]"):
        writer.finish()


def test_object_store_code_path_round_trip_and_resume():
    """The non-local branch (direct PUTs, no rename) through a pyarrow filesystem in memory."""
    fsspec = pytest.importorskip("fsspec")
    from pyarrow.fs import FSSpecHandler, PyFileSystem

    memory = fsspec.filesystem("memory")
    memory.store.clear()
    fs = PyFileSystem(FSSpecHandler(memory))
    assert fs.type_name != "local"
    store = FeatureStore("bucket/features", filesystem=fs, shard_rows=3)
    feats = _features(7)
    with pytest.raises(KeyboardInterrupt):
        store.encode("k", {}, 7, CountingEncoder(feats, fail_after=1))
    assert store.open("k") is None
    counter = CountingEncoder(feats)
    entry = store.encode("k", {}, 7, counter)
    assert counter.calls == [(3, 6), (6, 7)]
    assert np.array_equal(store.open("k").to_numpy(), feats)  # type: ignore[union-attr]
    assert np.array_equal(entry.to_numpy(np.array([6, 2])), feats[[6, 2]])


def test_filesystem_for_reads_the_s3_endpoint_from_the_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:8333")
    monkeypatch.setenv("AWS_REGION", "us-east-1")
    fs, path = filesystem_for("s3://bucket/some/prefix/")
    assert (fs.type_name, path) == ("s3", "bucket/some/prefix")
    options = fs.__reduce__()[1][0]  # pyarrow exposes the settings only through pickling
    assert (options["endpoint_override"], options["scheme"], options["region"]) == ("127.0.0.1:8333", "http",
                                                                                     "us-east-1")
    local, local_path = filesystem_for(tmp_path / "f")
    assert (local.type_name, local_path) == ("local", str(tmp_path / "f"))
