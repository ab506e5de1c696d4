"""A FixMatch job whose labeled images are class folders and whose pool is a flat folder: nothing is loaded
whole, the split is drawn from the listing and written as Parquet, corrupt files are reported, not fatal."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

from jobs import data as job_data
from jobs import train
from jobs.config import load_config
from jobs.sources import SourceDataset, load_source_data

CONFIG = Path(__file__).resolve().parents[2] / "jobs" / "configs" / "semi" / "fm40_fixmatch.yaml"
COLOURS = {"red": (200, 40, 40), "green": (40, 190, 60), "blue": (50, 60, 210)}


def _jpeg(colour: tuple[int, int, int], rng: np.random.Generator) -> bytes:
    pixels = np.clip(np.array(colour) + rng.normal(0, 25, size=(30, 40, 3)), 0, 255).astype(np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="JPEG", quality=85)
    return buffer.getvalue()


@pytest.fixture()
def photo_folders(tmp_path):
    rng = np.random.default_rng(0)
    labeled, pool = tmp_path / "labeled", tmp_path / "pool"
    for name, colour in COLOURS.items():
        (labeled / name).mkdir(parents=True)
        for i in range(8):
            (labeled / name / f"{i:02d}.jpg").write_bytes(_jpeg(colour, rng))
    (labeled / "blue" / "99_truncated.jpg").write_bytes(_jpeg(COLOURS["blue"], rng)[:200])
    pool.mkdir()
    for i in range(40):
        (pool / f"img_{i:03d}.jpg").write_bytes(_jpeg(list(COLOURS.values())[i % 3], rng))
    (pool / "broken.jpg").write_bytes(b"not a jpeg at all")
    return labeled, pool


def _overrides(tmp_path, labeled, pool):
    return [f"data.dataset=imagefolder:{labeled}", f"data.unlabeled_source={pool}", "data.labels_per_class=2",
            "data.val_per_class=2", "data.test_limit=6", "data.image_size=16", "backbone.spec=random:small_cnn@8",
            "train.epochs=1", "train.steps_per_epoch=6", "train.batch_size=4", "train.eval_every=1", "method.mu=2",
            "data.shuffle_buffer=8", f"run.output_dir={tmp_path / 'runs'}", f"run.feature_store={tmp_path / 'cache'}"]


def test_split_is_drawn_from_the_listing_and_corrupt_labeled_files_leave_it(ray_cluster, tmp_path, photo_folders):
    labeled, pool = photo_folders
    cfg = load_config(CONFIG, _overrides(tmp_path, labeled, pool))
    dataset, split = load_source_data(cfg.data, cfg.seed, 16, run_dir=tmp_path)
    assert isinstance(dataset, SourceDataset) and dataset.class_names == ["blue", "green", "red"]
    assert dataset.pool_size(split) == 41 and len(split.unlabeled) == 0  # the pool is the flat folder
    manifest = pq.read_table(tmp_path / "split.parquet").to_pandas()
    assert sorted(manifest["subset"].unique()) == ["labeled", "test", "val"]
    assert len(manifest[manifest["subset"] == "labeled"]) == 6
    decoded = dataset.train.images[split.labeled]
    assert decoded.shape == (6, 3, 16, 16) and decoded.dtype == np.uint8
    # Red images decode red: channel 0 dominates.
    red = split.labeled[dataset.train.labels[split.labeled] == dataset.class_names.index("red")]
    assert (dataset.train.images[red][:, 0].mean() > dataset.train.images[red][:, 2].mean() + 50)
    # The truncated file is either never drawn or reported and left out; it never reaches a subset.
    paths = set(manifest["path"])
    assert not any(p.endswith("99_truncated.jpg") for p in paths)
    # The same seed over the same files gives the same split.
    again, split2 = load_source_data(cfg.data, cfg.seed, 16)
    assert np.array_equal(split.labeled, split2.labeled) and again.fingerprint == dataset.fingerprint


@pytest.mark.slow  # a whole FixMatch job on decoded photo folders: ~1.5 min on 2 cores (run with -m slow)
@pytest.mark.timeout(600)
def test_fixmatch_streams_a_flat_pool_folder(ray_cluster, tmp_path, photo_folders):
    labeled, pool = photo_folders
    metrics = train.main(["--config", str(CONFIG), *_overrides(tmp_path, labeled, pool)])
    assert metrics["epochs"] == 1 and 0.0 <= metrics["test"]["top1"] <= 1.0
    # 6 steps x mu 2 x batch 4 = 48 pool rows > 40 readable images: the whole pool was streamed at least once.
    skipped = metrics["streamed_skipped_files"]["unlabeled"]
    assert skipped["skipped"] >= 1 and any(p["path"].endswith("broken.jpg") for p in skipped["paths"])
    run_dir = tmp_path / "runs" / "fm40-fixmatch"
    assert (run_dir / "split.parquet").exists() and (run_dir / "tracking" / "tensorboard").is_dir()


def test_pool_features_keep_every_row_resume_and_hit_without_pixels(ray_cluster, tmp_path, photo_folders):
    """The teachers' input: one feature per pool file (a corrupt one encoded black and reported), then a hit."""
    labeled, pool = photo_folders
    cfg = load_config(CONFIG, _overrides(tmp_path, labeled, pool))
    dataset, split = job_data.load_data(cfg, tmp_path / "run")
    stats: dict = {}
    spec, size = "pixels", 16
    features = job_data.pool_features(cfg, dataset, split, spec, size, stats, use_gpu=False)
    assert features.shape[0] == 41  # 40 photos and broken.jpg: a row each
    first = stats[spec][0]
    assert not first["hit"] and first["decode_failures"]["skipped"] == 1
    assert first["decode_failures"]["paths"][0]["path"].endswith("broken.jpg")
    broken = [str(p) for p in dataset.pool_table.column("path").to_pylist()].index(str(pool / "broken.jpg"))
    assert np.ptp(features[broken]) == 0 and (np.ptp(features[np.arange(41) != broken], axis=1) > 0).all()  # black
    again = job_data.pool_features(cfg, dataset, split, spec, size, stats, use_gpu=False)
    assert stats[spec][1]["hit"] and np.array_equal(again, features)


def test_images_decode_at_the_backbones_input_size_unless_set():
    def size(*overrides):
        return job_data.decode_size(load_config(CONFIG, list(overrides)))

    assert size("backbone.spec=efficientnet_lite:0") == 224  # the encoder's trained resolution, not 64
    assert size("backbone.spec=efficientnet_lite:0", "backbone.image_size=112") == 112
    assert size("backbone.spec=efficientnet_lite:0", "data.image_size=96") == 96
    assert size("backbone.spec=random:small_cnn@8") == 64  # built from scratch: any size; the old default
