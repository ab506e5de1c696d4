"""Seeded, saved splits: k labeled images per class, an unlabeled pool, validation, test.

The split is a pure function of the labels and the seed, so every worker and every
later job (probes, pseudo-labels, ensembles) sees the same images; it is also written
into the run directory so a run can be audited and reproduced.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from polyclip.io import atomic_write_json


class SplitError(ValueError):
    """A split cannot be made from the data; the message names the class."""


@dataclass(frozen=True)
class Split:
    """Indices of each split.

    ``labeled``, ``unlabeled`` and ``val`` index the dataset's train pool; ``test``
    indexes the test pool when ``test_from == "test"``, else the train pool.
    """

    seed: int
    labels_per_class: int
    labeled: np.ndarray
    unlabeled: np.ndarray
    val: np.ndarray
    test: np.ndarray
    test_from: str

    def to_dict(self) -> dict[str, object]:
        out: dict[str, object] = asdict(self)
        for key in ("labeled", "unlabeled", "val", "test"):
            out[key] = getattr(self, key).tolist()
        return out

    @classmethod
    def from_dict(cls, data: dict[str, object]) -> Split:
        arrays = {k: np.asarray(data[k], dtype=np.int64) for k in ("labeled", "unlabeled", "val", "test")}
        return cls(
            seed=int(data["seed"]),  # type: ignore[call-overload]
            labels_per_class=int(data["labels_per_class"]),  # type: ignore[call-overload]
            test_from=str(data["test_from"]),
            **arrays,
        )

    def save(self, path: str | os.PathLike[str]) -> Path:
        """Write the split as JSON (atomically)."""
        return atomic_write_json(path, self.to_dict())

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> Split:
        return cls.from_dict(json.loads(Path(path).read_text()))


def make_split(
    train_labels: np.ndarray,
    class_names: list[str],
    *,
    labels_per_class: int,
    seed: int,
    val_per_class: int = 50,
    unlabeled: int | None = None,
    test_labels: np.ndarray | None = None,
    test_limit: int | None = None,
    test_fraction: float = 0.2,
) -> Split:
    """Draw a split.

    Args:
        train_labels: Labels of the train pool.
        class_names: Names, for error messages.
        labels_per_class: k labeled images per class (``-1`` for every image not in val).
        seed: Same seed, same split, on every machine.
        val_per_class: Validation images per class, drawn from the train pool.
        unlabeled: Size cap of the unlabeled pool (the rest of the train pool); ``None``
            for all.
        test_labels: Labels of a separate test pool, if the dataset has one.
        test_limit: Cap on test images (a class-stratified sample); ``None`` for all.
        test_fraction: Share of each class held out as test when there is no test pool.

    Raises:
        SplitError: A class has no images, or fewer than the split asks for.
    """
    rng = np.random.default_rng(seed)
    num_classes = len(class_names)
    labeled, val, rest, test = [], [], [], []
    for c in range(num_classes):
        idx = np.flatnonzero(train_labels == c)
        if idx.size == 0:
            raise SplitError(f"class {class_names[c]!r} has no images in the train pool")
        idx = rng.permutation(idx)
        n_test = 0
        if test_labels is None:
            n_test = max(1, int(round(idx.size * test_fraction)))
        k = idx.size - n_test - val_per_class if labels_per_class < 0 else labels_per_class
        need = k + val_per_class + n_test
        if k < 1 or need > idx.size:
            raise SplitError(
                f"class {class_names[c]!r} has {idx.size} images but the split needs {need} "
                f"({labels_per_class} labeled + {val_per_class} validation + {n_test} test)"
            )
        test.append(idx[:n_test])
        labeled.append(idx[n_test : n_test + k])
        val.append(idx[n_test + k : need])
        rest.append(idx[need:])
    unlabeled_idx = rng.permutation(np.concatenate(rest))
    if unlabeled is not None:
        unlabeled_idx = unlabeled_idx[:unlabeled]
    if test_labels is not None:
        test_idx = np.arange(len(test_labels))
        if test_limit is not None and test_limit < len(test_idx):
            test_idx = _stratified_sample(test_labels, test_limit, rng)
        test_from = "test"
    else:
        test_idx = np.concatenate(test)
        if test_limit is not None and test_limit < len(test_idx):
            test_idx = test_idx[_stratified_sample(train_labels[test_idx], test_limit, rng)]
        test_from = "train"
    return Split(
        seed=seed,
        labels_per_class=labels_per_class,
        labeled=np.sort(np.concatenate(labeled)),
        unlabeled=np.sort(unlabeled_idx),
        val=np.sort(np.concatenate(val)),
        test=np.sort(test_idx),
        test_from=test_from,
    )


def _stratified_sample(labels: np.ndarray, n: int, rng: np.random.Generator) -> np.ndarray:
    """``n`` indices into ``labels`` with every class in proportion."""
    order = rng.permutation(len(labels))
    # Round-robin over classes in a random order keeps the sample balanced.
    by_class = [order[labels[order] == c] for c in np.unique(labels)]
    picked: list[int] = []
    depth = 0
    while len(picked) < n:
        for members in by_class:
            if depth < len(members) and len(picked) < n:
                picked.append(int(members[depth]))
        depth += 1
    return np.sort(np.asarray(picked, dtype=np.int64))
