import pytest
import torch

from polyclip.losses import CosineEmbeddingLoss, HingeRankLoss


def _cos(a, b):
    return float(a @ b / (a.norm() * b.norm()))


def _naive_all(v, y, t, margin):
    total = 0.0
    for i in range(len(y)):
        pos = _cos(v[i], t[y[i]])
        total += sum(max(0.0, margin - pos + _cos(v[i], t[j])) for j in range(len(t)) if j != y[i])
    return total / len(y)


@pytest.mark.parametrize("margin", [0.0, 0.1, 1.0])
def test_all_negatives_matches_naive_loop(margin):
    g = torch.Generator().manual_seed(0)
    v, t = torch.randn(10, 6, generator=g), torch.randn(5, 6, generator=g)
    y = torch.randint(0, 5, (10,), generator=g)
    loss = HingeRankLoss(margin=margin, negatives="all")(v, y, t)
    assert loss.item() == pytest.approx(_naive_all(v, y, t, margin), rel=1e-5, abs=1e-7)


def test_sampled_negatives_are_wrong_labels_and_seeded():
    g = torch.Generator().manual_seed(2)
    v, t = torch.randn(64, 6, generator=g), torch.randn(4, 6, generator=g)
    y = torch.randint(0, 4, (64,), generator=g)
    # Replay the generator to know which negatives were drawn, then check the loss against them.
    offsets = torch.randint(1, 4, (64,), generator=torch.Generator().manual_seed(7))
    negatives = (y + offsets) % 4
    assert (negatives != y).all() and set(negatives.tolist()) == {0, 1, 2, 3}
    expected = sum(max(0.0, 0.1 - _cos(v[i], t[y[i]]) + _cos(v[i], t[negatives[i]])) for i in range(64)) / 64
    loss = HingeRankLoss(negatives="sampled", seed=7)(v, y, t)
    assert loss.item() == pytest.approx(expected, rel=1e-5)
    assert HingeRankLoss(negatives="sampled", seed=7)(v, y, t).item() == pytest.approx(loss.item())


def test_zero_when_ranked_beyond_margin_and_gradients_otherwise():
    t = torch.eye(3)
    v = torch.tensor([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]])
    assert HingeRankLoss(margin=0.1)(v, torch.tensor([0, 1]), t).item() == 0.0
    v = torch.randn(4, 3, requires_grad=True)
    HingeRankLoss(margin=0.5)(v, torch.tensor([0, 1, 2, 0]), t).backward()
    assert v.grad is not None and v.grad.abs().sum() > 0


def test_hinge_validation():
    with pytest.raises(ValueError, match="negatives"):
        HingeRankLoss(negatives="hardest")
    with pytest.raises(ValueError, match="two labels"):
        HingeRankLoss()(torch.randn(2, 3), torch.tensor([0, 0]), torch.randn(1, 3))


def test_cosine_embedding_matches_naive_loop_and_has_gradients():
    g = torch.Generator().manual_seed(3)
    v, t = torch.randn(7, 5, generator=g, requires_grad=True), torch.randn(4, 5, generator=g)
    y = torch.tensor([0, 1, 2, 3, 0, 1, 2])
    loss = CosineEmbeddingLoss()(v, y, t)
    expected = sum(1 - _cos(v[i].detach(), t[y[i]]) for i in range(7)) / 7
    assert loss.item() == pytest.approx(expected, rel=1e-5)
    loss.backward()
    assert v.grad is not None and v.grad.abs().sum() > 0
    assert CosineEmbeddingLoss()(t * 3, torch.arange(4), t).item() == pytest.approx(0.0, abs=1e-6)
