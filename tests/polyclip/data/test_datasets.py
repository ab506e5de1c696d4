import io

import numpy as np
import pytest
from PIL import Image

from polyclip.data.datasets import FASHION_MNIST_CLASSES, DatasetError, load_dataset


def test_fashion_mnist_is_real_and_named(fashion_mnist):
    ds = fashion_mnist
    assert ds.class_names == FASHION_MNIST_CLASSES
    assert ds.class_names[0] == "T-shirt/top" and ds.class_names[-1] == "ankle boot"
    assert ds.train.images.shape == (60000, 1, 28, 28) and ds.test.images.shape == (10000, 1, 28, 28)
    assert np.bincount(ds.test.labels).tolist() == [1000] * 10
    assert ds.train.images.dtype == np.uint8 and ds.train.images.max() == 255


def test_synthetic_is_deterministic_and_balanced():
    a, b = load_dataset("synthetic", seed=3), load_dataset("synthetic", seed=3)
    assert np.array_equal(a.train.images, b.train.images)
    assert a.fingerprint == b.fingerprint != load_dataset("synthetic", seed=4).fingerprint
    assert np.bincount(a.train.labels).min() == np.bincount(a.train.labels).max()


def test_unknown_spec_names_valid_ones():
    with pytest.raises(DatasetError, match="valid: 'fashion_mnist'"):
        load_dataset("cifar10")


def _write(path, color, size=(20, 20)):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, color).save(path)


@pytest.fixture()
def image_folder(tmp_path):
    for i in range(4):
        _write(tmp_path / "cat" / f"{i}.png", (200, 50, 50))
        _write(tmp_path / "dog" / f"{i}.jpg", (50, 50, 200))
    buf = io.BytesIO()
    Image.new("RGB", (20, 20)).save(buf, format="JPEG")
    (tmp_path / "cat" / "truncated.jpg").write_bytes(buf.getvalue()[:50])
    (tmp_path / "dog" / "notes.png").write_text("not an image")
    (tmp_path / "dog" / "empty.webp").write_bytes(b"")
    return tmp_path


def test_imagefolder_skips_corrupt_files_with_paths(image_folder):
    ds = load_dataset(f"imagefolder:{image_folder}", image_size=16)
    assert ds.class_names == ["cat", "dog"]
    assert ds.train.images.shape == (8, 3, 16, 16)
    assert sorted(p.split("/")[-1] for p, _ in ds.skipped) == ["empty.webp", "notes.png", "truncated.jpg"]
    assert ds.train.images[ds.train.labels == 0][:, 0].mean() > 150  # cats are red


def test_imagefolder_strict_rejects_corrupt_file(image_folder):
    with pytest.raises(DatasetError, match=r"truncated\.jpg|notes\.png|empty\.webp"):
        load_dataset(f"imagefolder:{image_folder}", image_size=16, strict=True)


def test_imagefolder_empty_class_is_named(image_folder):
    (image_folder / "bird").mkdir()
    with pytest.raises(DatasetError, match="'bird'"):
        load_dataset(f"imagefolder:{image_folder}")


def test_imagefolder_with_train_and_test_folders(tmp_path):
    for split in ("train", "test"):
        for name, color in (("a", (255, 0, 0)), ("b", (0, 255, 0))):
            for i in range(3):
                _write(tmp_path / split / name / f"{i}.png", color)
    ds = load_dataset(f"imagefolder:{tmp_path}", image_size=8)
    assert ds.test is not None and len(ds.test) == 6 and len(ds.train) == 6
