import numpy as np
import pytest

from polyclip.ensemble import resolve_protocol


def test_split_is_disjoint_per_class_and_covers_every_class():
    labels = np.repeat(np.arange(4), [2, 10, 20, 3])
    split = resolve_protocol(labels, 4, protocol="split", seed=1)
    assert split.name == "split" and split.requested == "split"
    assert not set(split.head_indices) & set(split.combiner_indices)
    assert sorted(np.concatenate([split.head_indices, split.combiner_indices])) == list(range(len(labels)))
    comb_counts = np.bincount(labels[split.combiner_indices], minlength=4)
    head_counts = np.bincount(labels[split.head_indices], minlength=4)
    assert comb_counts.tolist() == [1, 1, 2, 1]  # 10% per class, at least one
    assert (head_counts >= 1).all()


def test_split_depends_on_the_seed_only():
    labels = np.repeat(np.arange(3), 10)
    a, b = resolve_protocol(labels, 3, seed=0), resolve_protocol(labels, 3, seed=0)
    c = resolve_protocol(labels, 3, seed=1)
    assert np.array_equal(a.combiner_indices, b.combiner_indices)
    assert not np.array_equal(a.combiner_indices, c.combiner_indices)


def test_one_label_per_class_falls_back_to_shared_and_says_why():
    split = resolve_protocol(np.arange(5), 5, protocol="auto")
    assert split.name == "shared" and split.requested == "auto" and "single label" in split.reason
    assert np.array_equal(split.head_indices, split.combiner_indices)
    with pytest.raises(ValueError, match="two labels per class"):
        resolve_protocol(np.arange(5), 5, protocol="split")


def test_given_heads_train_the_combiner_on_everything():
    split = resolve_protocol(np.arange(5), 5, fits_heads=False)
    assert split.name == "given_heads" and len(split.combiner_indices) == 5 and len(split.head_indices) == 0


def test_unknown_protocol_and_empty_class_are_errors():
    with pytest.raises(ValueError, match="auto, split, shared"):
        resolve_protocol(np.arange(3), 3, protocol="both")
    with pytest.raises(ValueError, match=r"\[2\]"):
        resolve_protocol(np.array([0, 1, 0, 1]), 3)
