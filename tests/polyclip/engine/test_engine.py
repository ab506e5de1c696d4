import itertools

import numpy as np
import pytest
import torch
from torch import nn

from polyclip.engine import LARS, ArrayLoader, build_optimizer, build_scheduler, fit_arrays
from polyclip.methods.probe import ProbeTask


def test_ranks_get_disjoint_shards_covering_the_data():
    arrays = {"x": np.arange(10), "y": np.arange(10)}
    seen = []
    for rank in range(3):
        loader = ArrayLoader(arrays, 2, seed=5, rank=rank, world_size=3)
        seen.append(np.concatenate([b["x"].numpy() for b in loader]))
    assert all(len(s) == 4 for s in seen)  # padded to equal length, like DistributedSampler
    assert set(np.concatenate(seen)) == set(range(10))
    # Without padding (12 = 3 x 4) the shards are disjoint.
    shards = [set(np.concatenate([b["x"].numpy() for b in ArrayLoader({"x": np.arange(12)}, 2, seed=5, rank=r,
                                                                         world_size=3)])) for r in range(3)]
    assert sum(map(len, shards)) == len(set().union(*shards)) == 12


def test_shuffle_is_seeded_per_epoch():
    loader = ArrayLoader({"x": np.arange(50)}, 50, seed=1)
    first = next(iter(loader))["x"]
    loader.set_epoch(1)
    second = next(iter(loader))["x"]
    loader.set_epoch(0)
    assert torch.equal(first, next(iter(loader))["x"]) and not torch.equal(first, second)


def test_fit_arrays_learns_a_separable_problem():
    torch.manual_seed(0)
    x = np.random.default_rng(0).normal(size=(400, 5)).astype(np.float32)
    y = (x[:, 0] > 0).astype(np.int64)
    task = ProbeTask(5, 2, l2_normalize=False)
    logs = fit_arrays(task, {"x": x, "y": y}, epochs=5, batch_size=32, optimizer="adam", lr=0.05,
                      scheduler="constant").history[-1]
    assert logs["train_acc"] > 0.9 and logs["train_loss"] < 0.4


def test_cosine_schedule_with_warmup():
    opt = build_optimizer(nn.Linear(2, 2).parameters(), "sgd", 1.0)
    sched = build_scheduler(opt, "cosine", total_steps=100, warmup_steps=10)
    lrs = []
    for _ in range(100):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert lrs[0] == pytest.approx(0.1) and lrs[9] == pytest.approx(1.0)
    assert lrs[-1] < 0.25 and all(a >= b for a, b in itertools.pairwise(lrs[10:]))


def test_lars_scales_steps_by_trust_ratio():
    torch.manual_seed(0)
    w = nn.Parameter(torch.randn(4, 4) * 10)
    opt = LARS([w], lr=1.0, momentum=0.0, weight_decay=0.0, trust_coefficient=0.01)
    w.grad = torch.randn(4, 4) * 1000
    before = w.detach().clone()
    opt.step()
    step = float((w.detach() - before).norm())
    assert step == pytest.approx(0.01 * float(before.norm()), rel=1e-4)  # independent of the gradient's scale
