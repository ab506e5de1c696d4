"""The zero-shot protocol: the seeded seen/unseen split and its report, against manual counts."""

import numpy as np
import pytest

from polyclip.metrics.zero_shot import choose_unseen, keep_seen, zero_shot_report

NAMES = ["cat", "dog", "car", "truck", "ship"]


def test_choose_unseen_by_name_or_seeded_draw():
    assert choose_unseen(NAMES, ["truck", "cat"], 0, seed=0) == [0, 3]
    drawn = choose_unseen(NAMES, None, 2, seed=7)
    assert drawn == choose_unseen(NAMES, None, 2, seed=7) and len(drawn) == 2
    assert len({tuple(choose_unseen(NAMES, None, 2, seed=s)) for s in range(10)}) > 1


@pytest.mark.parametrize(("names", "num", "match"), [
    (["horse"], 0, "'horse'.*valid"), (["cat", "cat"], 0, "duplicates"), (None, 4, "at least 2"),
    (None, 0, "needs unseen_classes"),
])
def test_choose_unseen_rejects_bad_splits(names, num, match):
    with pytest.raises(ValueError, match=match):
        choose_unseen(NAMES, names, num, seed=0)


def test_keep_seen_drops_unseen_rows_of_every_array():
    arrays = {"x": np.arange(10)[:, None], "y": np.array([0, 1, 2, 3, 4] * 2)}
    kept = keep_seen(arrays, [1, 3])
    assert set(kept["y"]) == {0, 2, 4} and (kept["x"][:, 0] % 5 == kept["y"]).all()


def test_zero_shot_report_matches_a_manual_count():
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 5, 200)
    scores = rng.normal(size=(200, 5)) + 2.0 * np.eye(5)[labels] * rng.integers(0, 2, (200, 1))
    unseen = [1, 3]
    out = zero_shot_report(scores, labels, NAMES, unseen, similarity=np.eye(5) * 0.5 + 0.5)
    rows = np.isin(labels, unseen)
    manual_unseen = np.mean(np.array(unseen)[scores[rows][:, unseen].argmax(1)] == labels[rows])
    seen = [0, 2, 4]
    manual_seen = np.mean(np.array(seen)[scores[~rows][:, seen].argmax(1)] == labels[~rows])
    assert out["unseen_top1"] == pytest.approx(manual_unseen)
    assert out["seen_top1"] == pytest.approx(manual_seen)
    assert out["generalised_top1"] == pytest.approx(np.mean(scores.argmax(1) == labels))
    assert out["unseen_classes"] == ["dog", "truck"] and out["unseen_chance"] == 0.5
    assert out["hit"]["hit@1"] == pytest.approx(out["generalised_top1"]) and out["hit"]["hit@10"] == 1.0
    assert {"top3_similarity", "control_similarity"} <= set(out["semantic"])
