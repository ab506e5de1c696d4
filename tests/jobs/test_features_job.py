"""``jobs.features``: Ray Data encoding into the feature store on a real 2-CPU cluster.

Real Fashion-MNIST images, the packaged EfficientNet-Lite0 at 64 px (small enough to
keep each encode to a few seconds on 2 cores).
"""

from __future__ import annotations

import logging

import numpy as np
import pytest

from jobs.features import BatchEncoder, cached_features, cpu_share, encode_dataset, images_dataset
from polyclip.backbones import create_backbone
from polyclip.features import FeatureCache, FeatureStore, encode_images

SPEC, SIZE, N, SHARD = "efficientnet_lite:0", 64, 160, 48


@pytest.fixture(scope="module")
def images(fashion_mnist):
    return np.ascontiguousarray(fashion_mnist.train.images[:N])


@pytest.fixture(scope="module")
def reference(images):
    import torch

    torch.manual_seed(0)
    return encode_images(create_backbone(SPEC, image_size=SIZE), images, batch_size=64)


def _items_dataset(images: np.ndarray, order: np.ndarray):
    import ray.data

    # Rows arrive out of order: the store must place them by `row`, not by arrival.
    return ray.data.from_items([{"row": int(i), "image": images[i]} for i in order], override_num_blocks=8)


def test_ray_data_encode_equals_in_process(ray_cluster, tmp_path, images, reference):
    store = FeatureStore(tmp_path / "store", shard_rows=SHARD)
    order = np.random.default_rng(0).permutation(N)
    stats: dict = {}
    entry = encode_dataset(_items_dataset(images, order), SPEC, SIZE, store, "k", use_gpu=False, batch_size=32,
                           concurrency=2, num_rows=N, stats=stats)
    assert (entry.num_rows, entry.dim) == (N, 1280)
    np.testing.assert_allclose(entry.to_numpy(), reference, rtol=1e-4, atol=1e-4)
    assert stats["encoded_rows"] == N and stats["shards_written"] == 4 and stats["shards_reused"] == 0


def test_ray_data_encode_resumes_with_only_the_missing_shards(ray_cluster, tmp_path, images, reference):
    store = FeatureStore(tmp_path / "store", shard_rows=SHARD)
    # What a job killed after finishing shards 0 and 3 leaves: their files, no index.
    killed = store.writer("k", {"backbone": SPEC}, N)
    for number in (0, 3):
        start, stop = killed.bounds(number)
        killed.write_shard(number, reference[start:stop])
    assert store.open("k") is None
    asked: list = []

    def rows_dataset(rows):  # what a source gives: only the asked rows are read and decoded
        asked.append(rows)
        return _items_dataset(images, np.random.default_rng(1).permutation(rows))

    resumed: dict = {}
    entry = encode_dataset(rows_dataset, SPEC, SIZE, store, "k", use_gpu=False, batch_size=32,
                           concurrency=1, num_rows=N, stats=resumed)
    missing = np.r_[np.arange(*killed.bounds(1)), np.arange(*killed.bounds(2))]
    assert len(asked) == 1 and np.array_equal(asked[0], missing)  # finished shards are never decoded again
    assert resumed["encoded_rows"] == 2 * SHARD  # the backbone saw only the missing shards' rows
    assert (resumed["shards_written"], resumed["shards_reused"]) == (2, 2)
    np.testing.assert_allclose(entry.to_numpy(), reference, rtol=1e-4, atol=1e-4)


@pytest.mark.slow  # one more Ray Data run; the store's read-back is covered without Ray in test_store.py
def test_feature_set_as_a_ray_dataset(ray_cluster, tmp_path):
    """Read back through Ray Data (a task per shard), as training and the probes would."""
    feats = np.random.default_rng(0).normal(size=(11, 6)).astype(np.float32)
    entry = FeatureStore(tmp_path, shard_rows=4).write_array("k", feats, {})
    rows = entry.to_ray_dataset().take_all()
    assert sorted(r["row"] for r in rows) == list(range(11))
    by_row = np.stack([r["features"] for r in sorted(rows, key=lambda r: r["row"])])
    assert np.array_equal(by_row, feats)


def test_cached_features_miss_hit_and_damaged_shard(ray_cluster, tmp_path, images, reference, caplog):
    cache = FeatureCache(tmp_path / "cache")
    indices = np.arange(N)
    stats: dict = {}

    def call():
        return cached_features(cache, SPEC, SIZE, "fp", "fashion_mnist", "train", indices, images,
                               num_workers=2, chunk=50, stats=stats)

    first = call()
    np.testing.assert_allclose(first, reference, rtol=1e-4, atol=1e-4)
    second = call()
    assert np.array_equal(first, second)
    assert [e["hit"] for e in stats[SPEC]] == [False, True]

    (key,) = [p.name for p in (tmp_path / "cache").iterdir()]
    (tmp_path / "cache" / key / "part-00000.npy").write_bytes(b"")  # what used to crash with EOFError
    with caplog.at_level(logging.WARNING):
        third = call()
    np.testing.assert_allclose(third, reference, rtol=1e-4, atol=1e-4)
    assert any("part-00000.npy" in r.getMessage() for r in caplog.records)
    assert [e["hit"] for e in stats[SPEC]] == [False, True, False]


@pytest.mark.slow  # one more Ray Data run
def test_bad_rows_are_named(ray_cluster, tmp_path, images):
    import ray.data

    store = FeatureStore(tmp_path, shard_rows=SHARD)
    ds = ray.data.from_items([{"row": 7 if i == 3 else i, "image": images[i]} for i in range(8)])
    with pytest.raises(ValueError, match=r"shard 0 .*got 7 of 8 rows"):
        encode_dataset(ds, "pixels", None, store, "dup", use_gpu=False, batch_size=4, concurrency=1, num_rows=8)
    ds = ray.data.from_items([{"row": 100, "image": images[0]}])
    with pytest.raises(ValueError, match="row 100 is outside"):
        encode_dataset(ds, "pixels", None, store, "far", use_gpu=False, batch_size=4, concurrency=1, num_rows=1)
    assert store.open("dup") is None and store.open("far") is None


def test_encoder_drops_rows_of_finished_shards_and_fractional_cpus():
    images = np.zeros((6, 1, 8, 8), dtype=np.uint8)
    encoder = BatchEncoder("pixels", None, keep_shards=[1], shard_rows=4)
    out = encoder({"row": np.arange(6), "image": images})
    assert out["row"].tolist() == [4, 5] and out["features"].shape == (2, encoder.backbone.num_features)
    np.testing.assert_array_equal(out["features"], encode_images(encoder.backbone, images[4:]))
    assert cpu_share(2, 2.0) == 0.5 and cpu_share(1, 2.0) == 1.0 and cpu_share(8, 64.0) == 1.0
    with pytest.raises(ValueError, match=r"\(N, C, H, W\)"):
        images_dataset(np.zeros((3, 8, 8), dtype=np.uint8))


def test_autocast_precision_choice_and_bf16_inference():
    import torch

    from jobs.features import inference_dtype

    assert inference_dtype(torch.device("cpu")) is None  # CPU actors stay fp32 unless asked
    assert inference_dtype(torch.device("cpu"), "bf16") is torch.bfloat16
    with pytest.raises(ValueError, match="'half'"):
        inference_dtype(torch.device("cpu"), "half")
    batch = {"row": np.arange(4), "image": np.random.default_rng(0).integers(0, 255, (4, 3, 32, 32), dtype=np.uint8)}
    fp32 = BatchEncoder("random:small_cnn@8", None, precision="fp32")(batch)["features"]
    bf16 = BatchEncoder("random:small_cnn@8", None, precision="bf16")(batch)["features"]
    assert bf16.dtype == np.float32 and not np.array_equal(bf16, fp32)  # autocast really ran in bf16
    np.testing.assert_allclose(bf16, fp32, rtol=0.05, atol=0.05)
