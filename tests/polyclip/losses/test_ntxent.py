import math

import pytest
import torch
import torch.nn.functional as F

from polyclip.losses.ntxent import NTXentLoss, gather_with_grad


def naive_ntxent(z1: torch.Tensor, z2: torch.Tensor, tau: float) -> torch.Tensor:
    """Equation (1) of the SimCLR paper, one anchor at a time."""
    z = torch.cat([z1, z2])
    n2 = z.shape[0]
    n = n2 // 2
    total = z.new_zeros(())
    for i in range(n2):
        pos = (i + n) % n2
        sim = [F.cosine_similarity(z[i], z[k], dim=0) / tau for k in range(n2)]
        denominator = sum(torch.exp(sim[k]) for k in range(n2) if k != i)
        total = total - torch.log(torch.exp(sim[pos]) / denominator)
    return total / n2


@pytest.mark.parametrize("tau", [0.1, 0.5, 1.0])
def test_matches_naive_reference_value_and_gradient(tau):
    torch.manual_seed(0)
    z1 = torch.randn(5, 7, dtype=torch.float64, requires_grad=True)
    z2 = torch.randn(5, 7, dtype=torch.float64, requires_grad=True)
    loss = NTXentLoss(tau)(z1, z2)
    grads = torch.autograd.grad(loss, (z1, z2))
    reference = naive_ntxent(z1, z2, tau)
    ref_grads = torch.autograd.grad(reference, (z1, z2))
    torch.testing.assert_close(loss, reference)
    for got, want in zip(grads, ref_grads):
        torch.testing.assert_close(got, want)


def test_known_values_at_the_extremes():
    # Orthogonal images, identical views: each anchor's positive has similarity 1, negatives 0.
    z = torch.eye(4)
    tau = 0.1
    minimum = -math.log(math.exp(1 / tau) / (math.exp(1 / tau) + 6))
    assert NTXentLoss(tau)(z, z).item() == pytest.approx(minimum, abs=1e-6)
    # All embeddings equal: the positive is one of 2N-1 equal candidates.
    same = torch.ones(4, 3)
    assert NTXentLoss(0.5)(same, same).item() == pytest.approx(math.log(7), rel=1e-5)


def test_scale_invariant_and_symmetric_in_views():
    torch.manual_seed(1)
    z1, z2 = torch.randn(6, 4), torch.randn(6, 4)
    loss = NTXentLoss(0.3)
    torch.testing.assert_close(loss(z1, z2), loss(3 * z1, 0.5 * z2))
    torch.testing.assert_close(loss(z1, z2), loss(z2, z1))


def test_bad_input_is_named():
    with pytest.raises(ValueError, match="temperature must be > 0, got 0"):
        NTXentLoss(0.0)
    with pytest.raises(ValueError, match=r"\(4, 3\) and \(4, 2\)"):
        NTXentLoss()(torch.randn(4, 3), torch.randn(4, 2))
    with pytest.raises(ValueError, match="at least 2 pairs"):
        NTXentLoss()(torch.randn(1, 3), torch.randn(1, 3))


def test_gather_is_identity_without_a_process_group():
    x = torch.randn(3, 2)
    assert gather_with_grad(x) is x
