import numpy as np
import pytest

from polyclip.data.splits import Split, SplitError, make_split

NAMES = [f"c{i}" for i in range(5)]


def _labels(n_per=100):
    return np.repeat(np.arange(5), n_per)


def test_split_is_seeded_disjoint_and_balanced():
    labels = _labels()
    a = make_split(labels, NAMES, labels_per_class=4, seed=1, val_per_class=10)
    b = make_split(labels, NAMES, labels_per_class=4, seed=1, val_per_class=10)
    c = make_split(labels, NAMES, labels_per_class=4, seed=2, val_per_class=10)
    assert np.array_equal(a.labeled, b.labeled) and not np.array_equal(a.labeled, c.labeled)
    assert np.bincount(labels[a.labeled]).tolist() == [4] * 5
    assert np.bincount(labels[a.val]).tolist() == [10] * 5
    sets = [set(a.labeled), set(a.val), set(a.unlabeled), set(a.test)]
    assert sum(len(s) for s in sets) == len(set().union(*sets)) == 500  # disjoint and complete
    assert a.test_from == "train"


def test_separate_test_pool_and_limit():
    split = make_split(_labels(), NAMES, labels_per_class=2, seed=0, val_per_class=5,
                       test_labels=_labels(20), test_limit=50)
    assert split.test_from == "test" and len(split.test) == 50
    assert np.bincount(_labels(20)[split.test]).tolist() == [10] * 5


def test_too_many_labels_names_the_class():
    labels = np.concatenate([_labels(), np.full(3, 5)])
    with pytest.raises(SplitError, match="'tiny'"):
        make_split(labels, [*NAMES, "tiny"], labels_per_class=4, seed=0, val_per_class=0, test_labels=labels)


def test_split_round_trips_through_json(tmp_path):
    split = make_split(_labels(), NAMES, labels_per_class=3, seed=7, unlabeled=40)
    split.save(tmp_path / "split.json")
    loaded = Split.load(tmp_path / "split.json")
    assert len(loaded.unlabeled) == 40
    for key in ("labeled", "unlabeled", "val", "test"):
        assert np.array_equal(getattr(loaded, key), getattr(split, key))
