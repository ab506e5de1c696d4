import itertools
import math

import pytest
import torch
from torch import nn

from polyclip.engine.optim import LARS, build_optimizer, build_scheduler, lr_factor, parameter_groups


def _run(name: str, total: int, warmup: int = 0, groups: int = 1) -> tuple[list[list[float]], list[float]]:
    """Learning rates of every group at every step, and the rates after the last step."""
    model = nn.Sequential(nn.Linear(2, 2), nn.BatchNorm1d(2))
    opt = build_optimizer(model if groups == 2 else model.parameters(), "sgd", 0.4, 1e-3)
    assert len(opt.param_groups) == groups
    sched = build_scheduler(opt, name, total, warmup)
    lrs = []
    for _ in range(total):
        lrs.append([g["lr"] for g in opt.param_groups])
        opt.step()
        sched.step()
    return lrs, sched.get_last_lr()


@pytest.mark.parametrize("groups", [1, 2])
def test_cosine_decays_to_exactly_zero_after_warmup(groups):
    lrs, last = _run("cosine", 100, warmup=10, groups=groups)
    assert all(lr == 0.0 for lr in last)  # last lr / base lr = 0
    assert lrs[0][0] == pytest.approx(0.04) and lrs[9][0] == pytest.approx(0.4) and lrs[10][0] == pytest.approx(0.4)
    # half way through the cosine part the rate is half the base rate
    assert lrs[55][0] == pytest.approx(0.2)
    decay = [step[0] for step in lrs[10:]]
    assert all(a > b for a, b in itertools.pairwise(decay))
    assert all(len(set(step)) == 1 for step in lrs)  # both groups follow the schedule


def test_fixmatch_cosine_ends_at_cos_7pi_over_16():
    lrs, last = _run("fixmatch_cosine", 64)
    assert last[0] / 0.4 == pytest.approx(math.cos(7 * math.pi / 16)) == pytest.approx(0.195, abs=5e-4)
    assert lrs[32][0] / 0.4 == pytest.approx(math.cos(7 * math.pi / 32))


def test_constant_and_plateau():
    lrs, last = _run("constant", 20, warmup=4)
    assert [s[0] for s in lrs[:4]] == pytest.approx([0.1, 0.2, 0.3, 0.4]) and last == [0.4]
    opt = build_optimizer(nn.Linear(2, 2).parameters(), "sgd", 0.1)
    assert build_scheduler(opt, "plateau", 10) is None


def test_lr_factor_matches_the_formulas():
    assert lr_factor("cosine", 0, 8) == 1.0 and lr_factor("cosine", 8, 8) == 0.0
    assert lr_factor("cosine", 4, 8) == pytest.approx(0.5)
    assert lr_factor("fixmatch_cosine", 3, 8) == pytest.approx(math.cos(7 * math.pi * 3 / (16 * 8)))


@pytest.mark.parametrize(("kwargs", "match"), [
    ({"name": "linear"}, "unknown scheduler 'linear'"),
    ({"total_steps": 0}, "total_steps must be >= 1, got 0"),
    ({"warmup_steps": -1}, "got -1"),
    ({"warmup_steps": 11}, "got 11"),
])
def test_bad_schedule_arguments_are_named(kwargs, match):
    opt = build_optimizer(nn.Linear(2, 2).parameters(), "sgd", 0.1)
    args = {"name": "cosine", "total_steps": 10, "warmup_steps": 0} | kwargs
    with pytest.raises(ValueError, match=match):
        build_scheduler(opt, **args)


class _Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.bn = nn.BatchNorm2d(4)
        self.ln = nn.LayerNorm(4)
        self.gn = nn.GroupNorm(2, 4)
        self.fc = nn.Linear(4, 2)
        self.frozen = nn.Linear(2, 2)
        self.frozen.requires_grad_(False)
        self.scale = nn.Parameter(torch.ones(4))
        self.tied = self.fc  # shared module: its parameters must appear once


def test_module_excludes_biases_and_norm_parameters_from_weight_decay():
    net = _Net()
    opt = build_optimizer(net, "sgd", 0.1, weight_decay=5e-4, momentum=0.9, nesterov=True)
    decayed, plain = opt.param_groups
    assert decayed["weight_decay"] == 5e-4 and plain["weight_decay"] == 0.0
    assert {id(p) for p in decayed["params"]} == {id(net.conv.weight), id(net.fc.weight)}
    expected = {net.conv.bias, net.bn.weight, net.bn.bias, net.ln.weight, net.ln.bias, net.gn.weight, net.gn.bias,
                net.fc.bias, net.scale}
    assert {id(p) for p in plain["params"]} == {id(p) for p in expected}
    assert len(plain["params"]) == len(expected)
    assert decayed["nesterov"] and decayed["momentum"] == 0.9


def test_decay_only_shrinks_the_decayed_group():
    """One step with zero gradients: only weights move (by lr * wd * w)."""
    net = nn.Sequential(nn.Linear(3, 3), nn.BatchNorm1d(3))
    with torch.no_grad():
        for p in net.parameters():
            p.fill_(1.0)
    opt = build_optimizer(net, "sgd", 0.5, weight_decay=0.1, momentum=0.0)
    for p in net.parameters():
        p.grad = torch.zeros_like(p)
    opt.step()
    assert torch.allclose(net[0].weight, torch.full((3, 3), 0.95))
    for p in (net[0].bias, net[1].weight, net[1].bias):
        assert torch.equal(p, torch.ones(3))


def test_iterable_of_parameters_keeps_one_decayed_group():
    net = _Net()
    opt = build_optimizer(net.parameters(), "adamw", 0.1, 0.05)
    assert len(opt.param_groups) == 1 and opt.param_groups[0]["weight_decay"] == 0.05
    assert len(opt.param_groups[0]["params"]) == sum(p.requires_grad for p in net.parameters())


@pytest.mark.parametrize("name", ["sgd", "adam", "adamw", "lars"])
def test_every_optimizer_accepts_a_module(name):
    net = _Net()
    opt = build_optimizer(net, name, 0.1, 1e-4)
    assert [g["weight_decay"] for g in opt.param_groups] == [1e-4, 0.0]
    assert isinstance(opt, LARS) == (name == "lars")
    net.fc(torch.randn(2, 4)).sum().backward()
    opt.step()


def test_parameter_groups_drop_empty_groups():
    assert [len(g["params"]) for g in parameter_groups(nn.LayerNorm(3), 0.1)] == [2]


@pytest.mark.parametrize(("args", "match"), [
    (("sgd", -0.1), "learning rate must be >= 0, got -0.1"),
    (("sgd", 0.1, -1.0), "weight_decay must be >= 0, got -1.0"),
    (("rmsprop", 0.1), "unknown optimizer 'rmsprop'"),
])
def test_bad_optimizer_arguments_are_named(args, match):
    with pytest.raises(ValueError, match=match):
        build_optimizer(nn.Linear(2, 2), *args)


def test_frozen_module_has_no_trainable_parameters():
    with pytest.raises(ValueError, match="no trainable parameters"):
        build_optimizer(nn.Linear(2, 2).requires_grad_(False), "sgd", 0.1)


def test_scheduler_state_round_trips_with_two_groups():
    net = nn.Sequential(nn.Linear(2, 2), nn.LayerNorm(2))
    opt = build_optimizer(net, "sgd", 0.2, 1e-4)
    sched = build_scheduler(opt, "cosine", 10, 2)
    for _ in range(5):
        opt.step()
        sched.step()
    opt2 = build_optimizer(net, "sgd", 0.2, 1e-4)
    sched2 = build_scheduler(opt2, "cosine", 10, 2)
    opt2.load_state_dict(opt.state_dict())
    sched2.load_state_dict(sched.state_dict())
    assert sched2.get_last_lr() == sched.get_last_lr() and [g["initial_lr"] for g in opt2.param_groups] == [0.2, 0.2]
