"""Loading a checkpoint into a fresh task: exact resume, and PBT's new hyperparameters on cloned weights."""

from __future__ import annotations

import copy

import pytest
import torch

from jobs.config import load_config
from jobs.trainer import load_training_state
from polyclip.engine import build_optimizer, build_scheduler

SMOKE = "jobs/configs/smoke_probe.yaml"


def _build(cfg, total=20, seed=0):
    torch.manual_seed(seed)
    model = torch.nn.Linear(4, 3)
    opt = build_optimizer(model.parameters(), "sgd", cfg.train.lr, cfg.train.weight_decay, 0.9, False)
    sched = build_scheduler(opt, "cosine", total, 0)
    return model, opt, sched


def _train(model, opt, sched, steps):
    for step in range(steps):
        x = torch.randn(8, 4, generator=torch.Generator().manual_seed(step))
        loss = model(x).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()


def _state(cfg, model, opt, sched, epoch=2):
    return copy.deepcopy({"task": model.state_dict(), "optimizer": opt.state_dict(), "scheduler": sched.state_dict(),
                          "plateau": None, "epoch": epoch, "history": [{"epoch": 1}, {"epoch": 2}], "resumes": [],
                          "train": cfg.dump()["train"]})


def test_same_config_resumes_exactly():
    cfg = load_config(SMOKE, ["train.lr=0.1"])
    model, opt, sched = _build(cfg)
    _train(model, opt, sched, 5)
    state = _state(cfg, model, opt, sched)
    model2, opt2, sched2 = _build(cfg, seed=1)
    epoch, history, resumes = load_training_state(state, cfg, model2, opt2, sched2, None)
    assert (epoch, len(history), resumes) == (2, 2, [2])
    assert opt2.param_groups[0]["lr"] == pytest.approx(opt.param_groups[0]["lr"])
    _train(model, opt, sched, 3)
    _train(model2, opt2, sched2, 3)
    for a, b in zip(model.parameters(), model2.parameters()):
        assert torch.equal(a, b)


def test_new_train_values_apply_to_cloned_weights_and_keep_the_schedule_position():
    donor_cfg = load_config(SMOKE, ["train.lr=0.1", "train.weight_decay=0.0"])
    model, opt, sched = _build(donor_cfg)
    _train(model, opt, sched, 5)
    state = _state(donor_cfg, model, opt, sched)
    cfg = load_config(SMOKE, ["train.lr=0.02", "train.weight_decay=0.001"])  # PBT's perturbed values
    model2, opt2, sched2 = _build(cfg, seed=1)
    load_training_state(state, cfg, model2, opt2, sched2, None)
    for a, b in zip(model.parameters(), model2.parameters()):
        assert torch.equal(a, b)
    group = opt2.param_groups[0]
    # lr = new base lr x the cosine factor at step 5 of 20, not the donor's lr, not the factor at 0.
    assert group["lr"] == pytest.approx(0.02 * sched.lr_lambdas[0](5))
    assert group["lr"] == pytest.approx(opt.param_groups[0]["lr"] * 0.2)
    assert group["weight_decay"] == 0.001 and sched2.last_epoch == 5
    # The momentum buffers came along.
    momentum = opt.state_dict()["state"][0]["momentum_buffer"]
    assert torch.equal(opt2.state_dict()["state"][0]["momentum_buffer"], momentum)
    sched2.step()
    assert opt2.param_groups[0]["lr"] == pytest.approx(0.02 * sched.lr_lambdas[0](6))


def test_weights_of_another_architecture_fail_naming_the_cause():
    cfg = load_config(SMOKE)
    model, opt, sched = _build(cfg)
    state = _state(cfg, model, opt, sched)
    other = torch.nn.Linear(4, 5)
    opt2 = build_optimizer(other.parameters(), "sgd", 0.1, 0.0, 0.9, False)
    with pytest.raises(RuntimeError, match="do not fit this job's model"):
        load_training_state(state, cfg, other, opt2, build_scheduler(opt2, "cosine", 20, 0), None)
