import pytest
import torch

from polyclip.ensemble import TemperatureCombiner, train_combiner


def _inputs(n_backbones=3, batch=7, classes=5, dims=(4, 6, 8), seed=0):
    g = torch.Generator().manual_seed(seed)
    feats = [torch.randn(batch, d, generator=g) for d in dims[:n_backbones]]
    logits = [3 * torch.randn(batch, classes, generator=g) for _ in range(n_backbones)]
    return feats, logits


@pytest.mark.parametrize("combine", ["divide", "multiply"])
@pytest.mark.parametrize("positivity", ["softplus", "exp"])
@pytest.mark.parametrize("feature_norm", ["l2", "none"])
def test_untrained_combiner_is_logit_averaging(combine, positivity, feature_norm):
    feats, logits = _inputs()
    comb = TemperatureCombiner([4, 6, 8], combine=combine, positivity=positivity, feature_norm=feature_norm)
    out, weights = comb(feats, logits)
    assert torch.allclose(out, torch.stack(logits).mean(0), atol=1e-5)
    assert torch.allclose(weights, torch.full((7, 3), 1 / 3), atol=1e-6)


def test_forward_matches_naive_sum_of_logits_over_temperatures():
    feats, logits = _inputs()
    comb = TemperatureCombiner([4, 6, 8])
    torch.nn.init.normal_(comb.mlp[2].weight, std=1.0)  # move away from the uniform start
    t = comb.scales(feats)
    out, weights = comb(feats, logits)
    for i in range(7):
        naive = sum(logits[b][i] / t[i, b] for b in range(3))
        assert torch.allclose(out[i], naive, atol=1e-5)
        inv = [1 / t[i, b] for b in range(3)]
        assert torch.allclose(weights[i], torch.stack(inv) / sum(inv), atol=1e-6)


@pytest.mark.parametrize("positivity", ["softplus", "exp"])
def test_temperatures_stay_positive_even_for_extreme_outputs(positivity):
    feats, _ = _inputs()
    comb = TemperatureCombiner([4, 6, 8], positivity=positivity, feature_norm="none", eps=1e-3)
    with torch.no_grad():
        comb.mlp[2].bias.fill_(-1e4)  # drives softplus / exp to zero
    t = comb.scales([1e3 * f for f in feats])
    assert (t >= 1e-3).all() and torch.isfinite(t).all()


def test_training_lowers_the_loss_is_seeded_and_keeps_temperatures_positive():
    feats, logits = _inputs(batch=12)
    y = torch.arange(12) % 5
    runs = []
    for _ in range(2):
        torch.manual_seed(0)
        comb = TemperatureCombiner([4, 6, 8])
        losses = train_combiner(comb, feats, logits, y, steps=60, lr=1e-2, batch_size=5, seed=3)
        runs.append((losses, comb.scales(feats).detach()))
    assert runs[0][0] == runs[1][0]
    assert runs[0][0][-1] < runs[0][0][0]
    assert (runs[0][1] > 0).all()


def test_invalid_options_name_the_valid_ones():
    with pytest.raises(ValueError, match="divide, multiply"):
        TemperatureCombiner([4], combine="add")
    with pytest.raises(ValueError, match="softplus, exp"):
        TemperatureCombiner([4], positivity="relu")
    comb = TemperatureCombiner([4, 6])
    with pytest.raises(ValueError, match="2 backbones"):
        comb.scales([torch.zeros(1, 4)])
