"""Dataset specs: ``fashion_mnist``, ``imagefolder:<path>`` and ``synthetic``.

Every dataset loads into memory as uint8 arrays in ``(N, C, H, W)`` layout, with a
train pool (labeled, unlabeled and validation images are drawn from it) and, when the
source has one, a separate test pool. Few-label work keeps datasets small enough for
this; a user with millions of unlabeled images points ``imagefolder:`` at a sample.
"""

from __future__ import annotations

import gzip
import hashlib
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from polyclip.data.images import IMAGE_EXTENSIONS, ImageDecodeError, decode_image

logger = logging.getLogger(__name__)

FASHION_MNIST_CLASSES = [
    "T-shirt/top",
    "trouser",
    "pullover",
    "dress",
    "coat",
    "sandal",
    "shirt",
    "sneaker",
    "bag",
    "ankle boot",
]

#: Where the Debian package ``dataset-fashion-mnist`` installs the files.
DEBIAN_FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist")
_FASHION_FILES = {
    "train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
    "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"),
}


class DatasetError(ValueError):
    """A dataset spec or its files are unusable; the message names the problem."""


@dataclass
class ImagePool:
    """Images and labels of one pool (train or test).

    Attributes:
        images: ``uint8`` array ``(N, C, H, W)``.
        labels: ``int64`` array ``(N,)``.
        paths: Source file of each image, when the images came from files.
    """

    images: np.ndarray
    labels: np.ndarray
    paths: list[str] | None = None

    def __len__(self) -> int:
        return int(self.labels.shape[0])


@dataclass
class Dataset:
    """A loaded dataset.

    Attributes:
        spec: The spec it was loaded from.
        class_names: Readable class names, index = label.
        train: Pool that labeled, unlabeled and validation splits come from.
        test: Separate test pool, or ``None`` when the split must carve one from ``train``.
        skipped: ``(path, reason)`` of every file skipped as unreadable.
    """

    spec: str
    class_names: list[str]
    train: ImagePool
    test: ImagePool | None
    skipped: list[tuple[str, str]] = field(default_factory=list)

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    @property
    def fingerprint(self) -> str:
        """A short content hash; part of feature-cache keys."""
        digest = hashlib.sha256(self.spec.encode())
        for pool in (self.train, self.test):
            if pool is None:
                continue
            digest.update(str(pool.images.shape).encode())
            digest.update(np.ascontiguousarray(pool.labels).tobytes())
            # A strided sample of pixels keeps hashing cheap on big pools.
            flat = pool.images.reshape(len(pool), -1)
            digest.update(np.ascontiguousarray(flat[:: max(1, len(pool) // 512)]).tobytes())
        return digest.hexdigest()[:16]


def load_dataset(
    spec: str,
    *,
    root: str | os.PathLike[str] | None = None,
    image_size: int | None = None,
    strict: bool = False,
    synthetic_size: int = 2000,
    seed: int = 0,
) -> Dataset:
    """Load a dataset from its spec.

    Args:
        spec: ``fashion_mnist``, ``imagefolder:<path>`` or ``synthetic``
            (``synthetic:<num_classes>`` for a different class count; tests only).
        root: Folder holding Fashion-MNIST's ``*-ubyte.gz`` files; defaults to the
            Debian package's location, then ``./data/fashion-mnist``.
        image_size: Side length images of an image folder are resized to
            (default 64). Fashion-MNIST and synthetic data keep their native size.
        strict: Fail on the first unreadable file instead of skipping it.
        synthetic_size: Train-pool size of the synthetic dataset.
        seed: Seed of the synthetic dataset.

    Returns:
        The loaded :class:`Dataset`.

    Raises:
        DatasetError: Unknown spec, missing files, empty classes, or (when strict) a
            corrupt image.
    """
    name, _, arg = spec.partition(":")
    if name == "fashion_mnist":
        return _load_fashion_mnist(root)
    if name == "imagefolder":
        if not arg:
            raise DatasetError("imagefolder needs a path: 'imagefolder:/path/to/images'")
        return _load_imagefolder(arg, image_size or 64, strict)
    if name == "synthetic":
        num_classes = int(arg) if arg else 10
        return make_synthetic(num_classes=num_classes, train_size=synthetic_size, seed=seed)
    raise DatasetError(
        f"unknown dataset spec {spec!r}; valid: 'fashion_mnist', 'imagefolder:<path>', 'synthetic'"
    )


def fashion_mnist_root(root: str | os.PathLike[str] | None = None) -> Path:
    """Find the folder holding Fashion-MNIST's gzip files.

    Raises:
        DatasetError: No candidate folder has all four files; says how to get them.
    """
    candidates = [Path(root)] if root else []
    if env := os.environ.get("POLYCLIP_FASHION_MNIST"):
        candidates.append(Path(env))
    candidates += [DEBIAN_FASHION_MNIST, Path("data/fashion-mnist"), Path("data/FashionMNIST/raw")]
    wanted = [f for pair in _FASHION_FILES.values() for f in pair]
    for candidate in candidates:
        if all((candidate / f).exists() for f in wanted):
            return candidate
    raise DatasetError(
        "Fashion-MNIST files not found in "
        + ", ".join(str(c) for c in candidates)
        + ". Install them with 'apt-get install dataset-fashion-mnist' (Debian) or "
        "'python -m polyclip.data.download fashion_mnist data/fashion-mnist', "
        "or set data.root / POLYCLIP_FASHION_MNIST to the folder."
    )


def _read_idx(path: Path, offset: int) -> np.ndarray:
    with gzip.open(path, "rb") as handle:
        return np.frombuffer(handle.read(), np.uint8, offset=offset)


def _load_fashion_mnist(root: str | os.PathLike[str] | None) -> Dataset:
    folder = fashion_mnist_root(root)
    pools = {}
    for split, (img_file, lbl_file) in _FASHION_FILES.items():
        images = _read_idx(folder / img_file, 16).reshape(-1, 1, 28, 28)
        labels = _read_idx(folder / lbl_file, 8).astype(np.int64)
        if len(images) != len(labels):
            raise DatasetError(f"{folder / img_file}: {len(images)} images but {len(labels)} labels")
        pools[split] = ImagePool(images=images, labels=labels)
    return Dataset(
        spec="fashion_mnist",
        class_names=list(FASHION_MNIST_CLASSES),
        train=pools["train"],
        test=pools["test"],
    )


def _scan_classes(folder: Path) -> tuple[list[str], list[list[Path]]]:
    classes = sorted(p.name for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not classes:
        raise DatasetError(f"{folder}: no class folders (expected one sub-folder per class)")
    files = []
    for name in classes:
        found = sorted(
            p for p in (folder / name).rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS
        )
        if not found:
            raise DatasetError(f"class {name!r} has no image files in {folder / name}")
        files.append(found)
    return classes, files


def _decode_pool(
    classes: list[str], files: list[list[Path]], size: int, strict: bool, skipped: list[tuple[str, str]]
) -> ImagePool:
    images, labels, paths = [], [], []
    for label, class_files in enumerate(files):
        for path in class_files:
            try:
                images.append(decode_image(path, size))
            except ImageDecodeError as exc:
                if strict:
                    raise DatasetError(f"{path}: {exc}") from exc
                logger.warning("skipping %s: %s", path, exc)
                skipped.append((str(path), str(exc)))
                continue
            labels.append(label)
            paths.append(str(path))
        if not any(lbl == label for lbl in labels):
            raise DatasetError(f"class {classes[label]!r} has no readable images")
    return ImagePool(
        images=np.stack(images), labels=np.asarray(labels, dtype=np.int64), paths=paths
    )


def _load_imagefolder(path: str, size: int, strict: bool) -> Dataset:
    folder = Path(path).expanduser()
    if not folder.is_dir():
        raise DatasetError(f"imagefolder path {folder} is not a directory")
    skipped: list[tuple[str, str]] = []
    test_dir = next((folder / d for d in ("test", "val") if (folder / d).is_dir()), None)
    train_dir = folder / "train" if (folder / "train").is_dir() and test_dir else folder
    classes, files = _scan_classes(train_dir)
    train = _decode_pool(classes, files, size, strict, skipped)
    test = None
    if test_dir is not None and train_dir != folder:
        test_classes, test_files = _scan_classes(test_dir)
        unknown = sorted(set(test_classes) - set(classes))
        if unknown:
            raise DatasetError(f"{test_dir} has classes not in {train_dir}: {unknown}")
        index = {name: i for i, name in enumerate(classes)}
        remapped: list[list[Path]] = [[] for _ in classes]
        for name, class_files in zip(test_classes, test_files):
            remapped[index[name]] = class_files
        present = [i for i, fs in enumerate(remapped) if fs]
        pool = _decode_pool([classes[i] for i in present], [remapped[i] for i in present], size, strict, skipped)
        pool.labels = np.asarray([present[i] for i in pool.labels], dtype=np.int64)
        test = pool
    if skipped:
        logger.warning("%d unreadable files skipped in %s", len(skipped), folder)
    return Dataset(spec=f"imagefolder:{folder}", class_names=classes, train=train, test=test, skipped=skipped)


def make_synthetic(
    *, num_classes: int = 10, train_size: int = 2000, test_size: int = 500, size: int = 28, seed: int = 0
) -> Dataset:
    """A learnable synthetic dataset for tests: class-specific oriented gratings plus noise.

    Each class has its own orientation and frequency, so a linear model on pixels gets
    well above chance and a small CNN near 100%. Never used outside tests and smoke runs.
    """
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / size

    def pool(n: int) -> ImagePool:
        labels = np.arange(n, dtype=np.int64) % num_classes
        rng.shuffle(labels)
        angle = labels[:, None, None] * np.pi / num_classes
        freq = 2.0 + (labels[:, None, None] % 3)
        phase = rng.uniform(0, 2 * np.pi, size=(n, 1, 1))
        wave = np.sin(2 * np.pi * freq * (xx * np.cos(angle) + yy * np.sin(angle)) + phase)
        img = 127.5 + 90 * wave + rng.normal(0, 25, size=wave.shape)
        return ImagePool(images=np.clip(img, 0, 255).astype(np.uint8)[:, None], labels=labels)

    # Real words, so word-vector methods can be tested on synthetic images too.
    words = ["cat", "dog", "car", "truck", "ship", "airplane", "bird", "horse", "frog", "deer"]
    names = words[:num_classes] if num_classes <= len(words) else [f"class{i}" for i in range(num_classes)]
    return Dataset(spec=f"synthetic:{num_classes}", class_names=names, train=pool(train_size), test=pool(test_size))
