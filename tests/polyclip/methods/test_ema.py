"""The weight EMA: warm-up decay computed on the device, no host read per step."""

import torch
from torch import nn

from polyclip.methods.ema import ModelEma


def test_warmup_update_never_reads_the_counter_on_the_host():
    # On the meta device any .item() / float() of the counter raises: the update (warm-up
    # formula included) must run entirely on the device, as it should on a GPU.
    net = nn.Sequential(nn.Linear(4, 3), nn.BatchNorm1d(3)).to("meta")
    ema = ModelEma(net, decay=0.999, warmup=True).to("meta")  # as the task is moved, counter included
    for _ in range(2):
        ema.update(net)
    assert ema.updates.device.type == "meta"


def test_warmup_decay_matches_the_formula_step_by_step():
    net = nn.Linear(1, 1, bias=False)
    ema = ModelEma(net, decay=0.99, warmup=True)
    with torch.no_grad():
        ema.module.weight.fill_(0.0)
        net.weight.fill_(1.0)
    expected = 0.0
    for n in range(40):
        decay = min(0.99, (1 + n) / (10 + n))
        expected = decay * expected + (1 - decay) * 1.0
        ema.update(net)
        assert abs(float(ema.module.weight) - expected) < 1e-6, n


def test_bf16_copy_follows_an_fp32_model():
    net = nn.Linear(2, 2)
    ema = ModelEma(net.to(torch.bfloat16), decay=0.5)
    net = net.float()
    with torch.no_grad():
        net.weight.fill_(1.0)
        ema.module.weight.fill_(0.0)
    ema.update(net)
    assert ema.module.weight.dtype == torch.bfloat16
    assert torch.equal(ema.module.weight, torch.full((2, 2), 0.5, dtype=torch.bfloat16))
