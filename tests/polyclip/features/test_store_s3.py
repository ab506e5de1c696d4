"""The feature store on a real S3-compatible server (SeaweedFS on loopback), through ``s3://`` URIs."""

from __future__ import annotations

import logging

import numpy as np
import pytest

from polyclip.features import FeatureCache, FeatureStore
from tests.s3_fixtures import s3_server  # noqa: F401 - the fixture

BUCKET = "features-bucket"


@pytest.fixture()
def s3_env(s3_server, monkeypatch):  # noqa: F811
    for name, value in s3_server.env().items():  # the variables a user sets for a real bucket
        monkeypatch.setenv(name, value)
    s3_server.filesystem().create_dir(BUCKET)
    return s3_server


def test_s3_round_trip_resume_and_damaged_shard(s3_env, caplog):
    store = FeatureStore(f"s3://{BUCKET}/store", shard_rows=4)
    assert store.fs.type_name == "s3"
    feats = np.random.default_rng(0).normal(size=(10, 6)).astype(np.float32)
    calls: list[tuple[int, int]] = []
    kill_after = [1]

    def encode(start: int, stop: int) -> np.ndarray:
        if len(calls) == kill_after[0]:
            raise KeyboardInterrupt("killed")
        calls.append((start, stop))
        return feats[start:stop]

    with pytest.raises(KeyboardInterrupt):
        store.encode("k", {"backbone": "x"}, 10, encode)
    assert calls == [(0, 4)] and store.open("k") is None  # one shard landed, no index yet

    calls.clear()
    kill_after[0] = -1
    entry = store.encode("k", {"backbone": "x"}, 10, encode)
    assert calls == [(4, 8), (8, 10)]
    # Read back through a fresh client: the bytes on the server, not a local copy.
    reopened = FeatureStore(f"s3://{BUCKET}/store").open("k")
    assert reopened is not None and np.array_equal(reopened.to_numpy(), feats)
    assert np.array_equal(entry.to_numpy(np.array([9, 1])), feats[[9, 1]])

    raw = s3_env.filesystem()
    with raw.open_output_stream(f"{BUCKET}/store/k/part-00002.npy") as out:
        out.write(b"")  # a zero-byte object
    with caplog.at_level(logging.WARNING):
        assert store.open("k") is None
        calls.clear()
        repaired = store.encode("k", {"backbone": "x"}, 10, encode)
    assert calls == [(8, 10)]
    assert np.array_equal(repaired.to_numpy(), feats)
    assert any("part-00002.npy" in r.getMessage() for r in caplog.records)


def test_feature_cache_on_s3(s3_env):
    cache = FeatureCache(f"s3://{BUCKET}/cache")
    feats = np.arange(12, dtype=np.float32).reshape(4, 3)
    assert cache.get("k") is None
    cache.put("k", feats, {"backbone": "x"})
    assert np.array_equal(cache.get("k"), feats)
    assert cache.path("k") == f"s3://{BUCKET}/cache/k"
