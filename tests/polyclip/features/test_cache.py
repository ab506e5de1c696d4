import numpy as np

from polyclip.backbones import create_backbone
from polyclip.features.cache import FeatureCache, encode_images, feature_key


def test_key_changes_with_every_input():
    idx = np.arange(5)
    base = feature_key("a", "p", "d", "train", idx)
    assert base == feature_key("a", "p", "d", "train", idx.copy())
    variants = [("b", "p", "d", "train", idx), ("a", "q", "d", "train", idx), ("a", "p", "e", "train", idx),
                ("a", "p", "d", "test", idx), ("a", "p", "d", "train", idx[:4])]
    assert len({feature_key(*v) for v in variants} | {base}) == 6


def test_cache_round_trip_and_damaged_entry(tmp_path):
    cache = FeatureCache(tmp_path)
    assert cache.get("k") is None
    feats = np.random.default_rng(0).normal(size=(3, 4)).astype(np.float32)
    cache.put("k", feats, {"backbone": "x"})
    assert np.array_equal(cache.get("k"), feats)
    (tmp_path / "k" / "part-00000.npy").write_bytes(b"garbage")
    assert cache.get("k") is None  # damaged entries are re-encoded, not crashed on


def test_old_single_file_entries_are_read_and_a_zero_byte_one_is_not_a_crash(tmp_path):
    cache = FeatureCache(tmp_path)
    feats = np.arange(6, dtype=np.float32).reshape(3, 2)
    np.save(tmp_path / "old.npy", feats, allow_pickle=False)
    assert np.array_equal(cache.get("old"), feats)
    (tmp_path / "empty.npy").write_bytes(b"")  # used to raise EOFError out of the job
    assert cache.get("empty") is None


def test_encode_images_matches_the_backbone_batchwise():
    backbone = create_backbone("pixels")
    images = np.random.default_rng(0).integers(0, 255, (7, 1, 28, 28), dtype=np.uint8)
    out = encode_images(backbone, images, batch_size=3)
    assert out.shape == (7, 784) and out.dtype == np.float32
    assert np.allclose(out[0], (images[0].reshape(-1) / 255 - 0.5) / 0.5, atol=1e-6)
