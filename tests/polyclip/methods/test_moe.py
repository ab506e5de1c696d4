import numpy as np
import pytest
import torch

from polyclip.methods.moe import (
    MixtureOfExpertsTask,
    assignment_from_names,
    confusion_affinity,
    fit_flat_probe,
    most_confused_pairs,
    superclasses_from_confusion,
    superclasses_from_vectors,
)
from polyclip.text.label_vectors import label_vectors
from polyclip.text.word_vectors import load_word_vectors


def _same_partition(a, b):
    return all((a[i] == a[j]) == (b[i] == b[j]) for i in range(len(a)) for j in range(len(a)))


def test_superclasses_from_glove_vectors_group_related_labels():
    labels = ["cat", "dog", "horse", "airplane", "truck", "ship", "shirt", "coat", "dress"]
    vectors = label_vectors(labels, load_word_vectors())
    expected = [0, 0, 0, 1, 1, 1, 2, 2, 2]
    for method in ("kmeans", "agglomerative"):
        groups = superclasses_from_vectors(vectors, 3, seed=0, method=method)
        assert _same_partition(groups, expected), (method, groups)
        assert groups[0] == 0 and sorted(set(groups)) == [0, 1, 2]
    assert superclasses_from_vectors(torch.from_numpy(vectors), 3) == superclasses_from_vectors(vectors, 3)
    with pytest.raises(ValueError, match="k must be"):
        superclasses_from_vectors(vectors, 10)


def _block_confusion():
    # Classes {0, 1, 2} confuse each other, {3, 4} each other; little across.
    cm = np.diag([50, 50, 50, 50, 50])
    for i, j, n in [(0, 1, 9), (1, 0, 7), (1, 2, 8), (2, 0, 6), (3, 4, 10), (4, 3, 12), (2, 3, 1)]:
        cm[i, j] = n
    return cm


@pytest.mark.parametrize("method", ["agglomerative", "spectral"])
def test_superclasses_from_confusion(method):
    groups = superclasses_from_confusion(_block_confusion(), 2, method=method)
    assert _same_partition(groups, [0, 0, 0, 1, 1]), groups
    assert superclasses_from_confusion(_block_confusion(), 1) == [0] * 5


def test_confusion_affinity_is_symmetric_rates():
    cm = np.array([[8, 2], [1, 9]])
    aff = confusion_affinity(cm)
    assert aff == pytest.approx(np.array([[0, (0.2 + 0.1) / 2], [(0.2 + 0.1) / 2, 0]]))


def test_most_confused_pairs():
    names = ["a", "b", "c", "d", "e"]
    cm = _block_confusion()
    assert most_confused_pairs(cm, names, 3) == [("e", "d", 12), ("d", "e", 10), ("a", "b", 9)]
    assert most_confused_pairs(cm, names, 2, symmetric=True) == [("d", "e", 22), ("a", "b", 16)]
    assert len(most_confused_pairs(cm, names, 100)) == 7  # zero counts are left out


def test_predict_is_a_normalised_factorised_distribution():
    torch.manual_seed(0)
    task = MixtureOfExpertsTask(12, [1, 0, 1, 2, 0, 1], 6, hidden=8, depth=2, routing="soft")
    x = torch.randn(5, 12)
    logp = task.predict(x)
    assert logp.shape == (5, 6)
    assert torch.allclose(logp.exp().sum(1), torch.ones(5), atol=1e-5)
    # Naive reference: p(c) = p(s(c)) p(c | s(c)) computed head by head.
    xn = torch.nn.functional.normalize(x, dim=1)
    gate = task.gate(xn).softmax(1)
    for c, s in enumerate([1, 0, 1, 2, 0, 1]):
        members = task.members[s]
        within = task.experts[s](xn).softmax(1)[:, members.index(c)]
        assert torch.allclose(logp[:, c].exp(), gate[:, s] * within, atol=1e-6)
    # Class 3 is alone in superclass 2: its probability is the gate's.
    assert torch.allclose(logp[:, 3].exp(), gate[:, 2], atol=1e-6)


def test_loss_is_gate_ce_plus_true_expert_ce_and_learns():
    torch.manual_seed(0)
    assignment = [0, 0, 1, 1, 2]
    task = MixtureOfExpertsTask(10, assignment, 5, expert_weight=0.5)
    x, y = torch.randn(20, 10), torch.arange(20) % 5
    out = task({"x": x, "y": y})
    xn = torch.nn.functional.normalize(x, dim=1)
    gate_ce = torch.nn.functional.cross_entropy(task.gate(xn), torch.tensor(assignment)[y])
    expert_ce = sum(
        -task.experts[assignment[int(c)]](xn[i:i + 1]).log_softmax(1)[0, task.members[assignment[int(c)]].index(int(c))]
        for i, c in enumerate(y)) / 20
    assert out["loss"].item() == pytest.approx(gate_ce.item() + 0.5 * expert_ce.item(), rel=1e-5)
    assert out["gate_loss"].item() == pytest.approx(gate_ce.item(), rel=1e-5)
    # Learnable: separable data reaches full accuracy.
    centers = torch.randn(5, 10) * 3
    x = centers[y] + 0.1 * torch.randn(20, 10)
    for _ in range(40):  # plain gradient descent: no optimizer start-up cost
        out = task({"x": x, "y": y})
        task.zero_grad()
        out["loss"].backward()
        with torch.no_grad():
            for p in task.parameters():
                p -= 2.0 * p.grad
    assert out["acc"] == 1.0 and (task.predict(x).argmax(1) == y).all()


def test_validation():
    with pytest.raises(ValueError, match="entries"):
        MixtureOfExpertsTask(4, [0, 1], 3)
    with pytest.raises(ValueError, match="none empty"):
        MixtureOfExpertsTask(4, [0, 2, 2], 3)


def _set_biases(task, gate_probs, expert_probs):
    """Zero weights and biases = log-probabilities: the task predicts the same for every input."""
    with torch.no_grad():
        for head in [task.gate, *task.experts]:
            for p in head.parameters():
                p.zero_()
        task.gate.bias.copy_(torch.tensor(gate_probs).log())
        for expert, probs in zip(task.experts, expert_probs):
            expert.bias.copy_(torch.tensor(probs).log())


def test_hard_routing_answers_with_the_expert_of_the_predicted_superclass():
    """Gate 0.6 / 0.4 over {0, 1, 2} and {3}: the product favours class 3 (0.4 > 0.6 / 3), routing does not."""
    assignment = [0, 0, 0, 1]
    hard = MixtureOfExpertsTask(5, assignment, 4, routing="hard")
    soft = MixtureOfExpertsTask(5, assignment, 4, routing="soft")
    for task in (hard, soft):
        _set_biases(task, [0.6, 0.4], [[0.34, 0.33, 0.33], [1.0]])
    x = torch.randn(3, 5)
    assert (soft.predict(x).argmax(1) == 3).all()
    assert (hard.predict(x).argmax(1) == 0).all()
    logp = hard.predict(x)
    # Inside the routed superclass: the expert's distribution; outside: the soft probability times the floor.
    assert torch.allclose(logp[:, :3].exp(), torch.tensor([0.34, 0.33, 0.33]).expand(3, 3), atol=1e-6)
    assert torch.allclose(logp[:, 3], soft.predict(x)[:, 3] + np.log(1e-6), atol=1e-5)
    assert hard({"x": x, "y": torch.tensor([0, 3, 3])})["acc"] == pytest.approx(1 / 3)
    assert soft({"x": x, "y": torch.tensor([0, 3, 3])})["acc"] == pytest.approx(2 / 3)
    # Both routings train on the same loss.
    y = torch.tensor([0, 1, 3])
    assert hard({"x": x, "y": y})["loss"].item() == pytest.approx(soft({"x": x, "y": y})["loss"].item())


def test_hard_routing_matches_a_naive_per_image_rule():
    torch.manual_seed(1)
    assignment = [1, 0, 1, 2, 0, 1]
    task = MixtureOfExpertsTask(12, assignment, 6, hidden=8, depth=2)
    assert task.routing == "hard"
    x = torch.randn(64, 12)
    xn = torch.nn.functional.normalize(x, dim=1)
    pred = task.predict(x).argmax(1)
    for i in range(len(x)):
        s = int(task.gate(xn[i:i + 1]).argmax())
        expected = task.members[s][int(task.experts[s](xn[i:i + 1]).argmax())]
        assert int(pred[i]) == expected


def test_unknown_routing_is_named():
    with pytest.raises(ValueError, match="routing must be one of \\('hard', 'soft'\\), got 'top2'"):
        MixtureOfExpertsTask(4, [0, 1], 2, routing="top2")


def test_moe_superclasses_from_names_are_checked():
    names = ["cat", "dog", "car"]
    assert assignment_from_names([["car"], ["dog", "cat"]], names) == [1, 1, 0]
    with pytest.raises(ValueError, match=r"unknown classes \['cow'\]"):
        assignment_from_names([["cat", "dog"], ["cow"]], names)
    with pytest.raises(ValueError, match=r"in several: \['cat'\], in none: \['car'\]"):
        assignment_from_names([["cat", "dog"], ["cat"]], names)


def test_fit_flat_probe_learns_separable_features_deterministically():
    rng = np.random.default_rng(0)
    y = np.repeat(np.arange(3), 20)
    x = (np.eye(3)[y] * 3 + 0.1 * rng.normal(size=(60, 3))).astype(np.float32)
    probe = fit_flat_probe(x, y, 3, epochs=50, lr=0.1, seed=0)
    again = fit_flat_probe(x, y, 3, epochs=50, lr=0.1, seed=0)
    assert not probe.training
    with torch.no_grad():
        logits = probe.predict(torch.from_numpy(x))
        assert torch.equal(logits, again.predict(torch.from_numpy(x)))
    assert (logits.argmax(1).numpy() == y).all()
