import math

import pytest
import torch

from polyclip.losses import CESLoss


def _similarity(c: int, seed: int = 0) -> torch.Tensor:
    v = torch.nn.functional.normalize(torch.randn(c, 8, generator=torch.Generator().manual_seed(seed)), dim=1)
    s = v @ v.T
    s.fill_diagonal_(1.0)
    return s


def _naive(logits, target, S, w_ce, w_sim, mode):
    total = 0.0
    for i in range(len(target)):
        row = logits[i].tolist()
        y = int(target[i])
        m = max(row)
        log_z = m + math.log(sum(math.exp(z - m) for z in row))
        ce = log_z - row[y]
        if mode == "soft":
            p = [math.exp(z - log_z) for z in row]
            total += w_ce * ce + w_sim * sum(p[c] * (1 - float(S[y, c])) for c in range(len(row)))
        else:
            pred = max(range(len(row)), key=lambda c: row[c])
            total += ce * (w_ce + w_sim * (1 - float(S[y, pred])))
    return total / len(target)


@pytest.mark.parametrize("mode", ["soft", "hard"])
@pytest.mark.parametrize(("w_ce", "w_sim"), [(0.8, 0.2), (1.0, 0.5)])
def test_matches_naive_loop(mode, w_ce, w_sim):
    g = torch.Generator().manual_seed(1)
    S = _similarity(6)
    logits = torch.randn(12, 6, generator=g) * 3
    target = torch.randint(0, 6, (12,), generator=g)
    loss = CESLoss(S, w_ce=w_ce, w_sim=w_sim, mode=mode)(logits, target)
    assert loss.item() == pytest.approx(_naive(logits, target, S, w_ce, w_sim, mode), rel=1e-5)


@pytest.mark.parametrize("mode", ["soft", "hard"])
def test_gradients_flow(mode):
    S = _similarity(5)
    logits = torch.randn(8, 5, requires_grad=True)
    CESLoss(S, mode=mode)(logits, torch.arange(8) % 5).backward()
    assert logits.grad is not None and logits.grad.abs().sum() > 0 and torch.isfinite(logits.grad).all()


def test_soft_gradient_prefers_the_similar_wrong_class():
    # Class 1 is close to the true class 0, class 2 is far. The similarity term's gradient
    # is p_c (d_c - E_p[d]): it pushes the far class down and lets the close one rise,
    # where plain cross-entropy pushes both wrong classes down alike.
    S = torch.tensor([[1.0, 0.9, -0.5], [0.9, 1.0, -0.4], [-0.5, -0.4, 1.0]])
    logits = torch.zeros(1, 3, requires_grad=True)
    CESLoss(S, w_ce=0.0, w_sim=1.0, mode="soft")(logits, torch.tensor([0])).backward()
    assert logits.grad[0, 2] > 0 > logits.grad[0, 1] > logits.grad[0, 0]


def test_hard_mode_weights_mistakes_by_distance():
    S = torch.tensor([[1.0, 0.9, -0.5], [0.9, 1.0, -0.4], [-0.5, -0.4, 1.0]])
    loss_fn = CESLoss(S, mode="hard")
    ce = torch.nn.functional.cross_entropy
    close = torch.tensor([[0.0, 2.0, 0.0]])  # predicts 1, similar to the true 0
    far = torch.tensor([[0.0, 0.0, 2.0]])  # predicts 2, far from 0; same cross-entropy
    y = torch.tensor([0])
    assert loss_fn(close, y).item() == pytest.approx(ce(close, y).item() * (0.8 + 0.2 * 0.1), rel=1e-6)
    assert loss_fn(far, y).item() == pytest.approx(ce(far, y).item() * (0.8 + 0.2 * 1.5), rel=1e-6)
    right = torch.tensor([[2.0, 0.0, 0.0]])
    assert loss_fn(right, y).item() == pytest.approx(0.8 * ce(right, y).item(), rel=1e-6)


def test_similarity_is_a_buffer_and_validated():
    loss_fn = CESLoss(_similarity(4))
    assert "similarity" in dict(loss_fn.named_buffers()) and not list(loss_fn.parameters())
    assert loss_fn.to(torch.float64).similarity.dtype == torch.float64
    with pytest.raises(ValueError, match="mode"):
        CESLoss(_similarity(4), mode="product")
    with pytest.raises(ValueError, match="square"):
        CESLoss(torch.ones(3, 4))
    with pytest.raises(ValueError, match="classes"):
        loss_fn(torch.randn(2, 5), torch.tensor([0, 1]))


def test_identity_similarity_soft_reduces_to_ce_plus_error_probability():
    logits, y = torch.randn(5, 4), torch.tensor([0, 1, 2, 3, 0])
    loss = CESLoss(torch.eye(4), w_ce=1.0, w_sim=1.0, mode="soft")(logits, y)
    expected = torch.nn.functional.cross_entropy(logits, y) + (1 - logits.softmax(1)[torch.arange(5), y]).mean()
    assert loss.item() == pytest.approx(expected.item(), rel=1e-6)


def test_default_is_the_papers_product_of_cross_entropy_and_semantic_distance():
    """Eq. (1) of the CES paper, with the cross-entropy weight kept: L = CE_i * (w_ce + w_sim * (1 - S[y, argmax]))."""
    S = torch.tensor([[1.0, 0.5, -0.2], [0.5, 1.0, 0.0], [-0.2, 0.0, 1.0]])
    logits, y = torch.tensor([[3.0, 0.0, 0.0], [2.0, 0.0, 0.0], [3.0, 0.0, 1.0]]), torch.tensor([0, 1, 2])
    ce = torch.nn.functional.cross_entropy(logits, y, reduction="none")
    predicted = logits.argmax(1)  # correct, a near mistake (S = 0.5), a far one (S = -0.2)
    expected = (ce * (0.8 + 0.2 * (1 - S[y, predicted]))).mean()
    assert CESLoss(S).mode == "hard"
    assert CESLoss(S)(logits, y).item() == pytest.approx(expected.item(), rel=1e-6)
