"""FixMatch: the loss against a naive reference, the task's masking and logging, EMA math."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from polyclip.backbones import create_backbone
from polyclip.losses.fixmatch import FixMatchLoss
from polyclip.methods.class_aware_threshold import ClassAwareThreshold
from polyclip.methods.ema import ModelEma
from polyclip.methods.fixmatch import FixMatchTask
from polyclip.methods.pseudo_label import ThresholdSchedule


def naive_fixmatch_loss(weak, strong, tau):
    total = 0.0
    for w, s in zip(weak, strong):
        q = torch.softmax(w, 0)
        label = int(q.argmax())
        threshold = tau[label] if isinstance(tau, torch.Tensor) else tau
        if q[label] >= threshold:
            total = total - torch.log_softmax(s, 0)[label]
    return total / len(weak)


@pytest.mark.parametrize("tau", [0.0, 0.6, 0.95, 1.0, "per_class"])
def test_loss_matches_naive_reference(tau):
    torch.manual_seed(0)
    weak = torch.randn(32, 5) * 3
    strong = torch.randn(32, 5, requires_grad=True)
    threshold = torch.linspace(0.3, 0.9, 5) if tau == "per_class" else tau
    loss, mask, pseudo = FixMatchLoss()(weak, strong, threshold)
    expected = naive_fixmatch_loss(weak, strong, threshold)
    assert torch.allclose(loss, torch.as_tensor(expected, dtype=loss.dtype), atol=1e-6)
    assert torch.equal(pseudo, weak.argmax(1))
    conf = torch.softmax(weak, 1).amax(1)
    tau_b = threshold[pseudo] if isinstance(threshold, torch.Tensor) else threshold
    assert torch.equal(mask, conf >= tau_b)
    if tau == 0.0:
        assert mask.all()
    if tau == 1.0:
        assert loss.item() == 0.0


def test_no_gradient_through_the_weak_view():
    weak = (torch.randn(8, 4) * 5).requires_grad_()
    strong = torch.randn(8, 4, requires_grad=True)
    loss, mask, _ = FixMatchLoss()(weak, strong, 0.5)
    assert mask.any()
    loss.backward()
    assert weak.grad is None
    assert strong.grad is not None and strong.grad[~mask].abs().sum() == 0


def test_shape_mismatch_is_an_error():
    with pytest.raises(ValueError, match="differ in shape"):
        FixMatchLoss()(torch.zeros(2, 3), torch.zeros(3, 3), 0.9)


def test_ema_update_math():
    net = nn.Sequential(nn.Linear(3, 2), nn.BatchNorm1d(2))
    ema = ModelEma(net, decay=0.9)
    before = {k: v.clone() for k, v in ema.module.state_dict().items()}
    with torch.no_grad():
        for p in net.parameters():
            p.add_(1.0)
    net.train()
    net(torch.randn(4, 3))  # moves running stats and num_batches_tracked
    ema.update(net)
    for name, value in ema.module.state_dict().items():
        current = net.state_dict()[name]
        if value.dtype.is_floating_point:
            assert torch.allclose(value, 0.9 * before[name] + 0.1 * current), name
        else:
            assert torch.equal(value, current), name
    assert not any(p.requires_grad for p in ema.parameters())
    with pytest.raises(ValueError, match="decay"):
        ModelEma(net, decay=1.0)


def test_ema_warmup_follows_the_weights_early_and_is_checkpointed():
    net = nn.Linear(2, 1, bias=False)
    ema = ModelEma(net, decay=0.999, warmup=True)
    with torch.no_grad():
        net.weight.fill_(1.0)
        ema.module.weight.fill_(0.0)
    ema.update(net)  # first update: decay min(0.999, 1/10) = 0.1
    assert torch.allclose(ema.module.weight, torch.full((1, 2), 0.9))
    for _ in range(300):
        ema.update(net)
    assert float(ema.module.weight.min()) > 0.95  # without warm-up: 1 - 0.999**301 = 0.26
    assert int(ema.state_dict()["updates"]) == 301


def tiny_task(**kwargs):
    torch.manual_seed(0)
    backbone = create_backbone("random:small_cnn@4", in_chans=1)
    return FixMatchTask(backbone, 3, weak=nn.Identity(), strong=nn.Identity(), class_names=["a", "b", "c"], **kwargs)


def batch(n=4, mu=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    out = {"x": torch.randint(0, 256, (n, 1, 28, 28), dtype=torch.uint8, generator=g),
           "y": torch.randint(0, 3, (n,), generator=g),
           "u_x": torch.randint(0, 256, (n * mu, 1, 28, 28), dtype=torch.uint8, generator=g),
           "u_y": torch.randint(0, 3, (n * mu,), generator=g),
           "u_teacher_y": torch.randint(0, 3, (n * mu,), generator=g),
           "u_teacher_conf": torch.rand(n * mu, generator=g)}
    return out


@pytest.mark.parametrize("options", [{}, {"teacher_mode": "fallback"}, {"teacher_mode": "extra_labeled"},
                                     {"thresholds": ClassAwareThreshold(3, init=0.4)}])
def test_unlabeled_true_labels_never_reach_the_loss(options):
    task = tiny_task(threshold=0.0, teacher_schedule=ThresholdSchedule(0.5), **options).eval()
    b = batch()
    shuffled = dict(b, u_y=b["u_y"].flip(0) + 0)
    without = {k: v for k, v in b.items() if k != "u_y"}
    losses = [task(dict(v))["loss"] for v in (b, shuffled, without)]
    assert torch.equal(losses[0], losses[1]) and torch.equal(losses[0], losses[2])


def test_task_loss_is_supervised_plus_masked_consistency():
    task = tiny_task(threshold=0.0, lambda_u=0.5, ema_decay=None).eval()
    b = batch()
    out = task(b)
    unit = task.model.backbone.to_unit
    logits_x, logits_u = task.model(unit(b["x"])), task.model(unit(b["u_x"]))
    expected = F.cross_entropy(logits_x, b["y"]) + 0.5 * naive_fixmatch_loss(logits_u, logits_u, 0.0)
    assert torch.allclose(out["loss"], expected, atol=1e-5)


def test_epoch_summary_mask_rate_accuracy_and_counts():
    task = tiny_task(threshold=0.0, thresholds=None)  # threshold 0: every pseudo-label is accepted
    b = batch(n=4, mu=3)
    task.train()
    task(b)
    with torch.no_grad():
        task.eval()
        pseudo = task.model(task.model.backbone.to_unit(b["u_x"])).argmax(1)
    summary = task.epoch_summary()
    assert summary["mask_rate"] == 1.0
    assert sum(summary[f"accepted/{c}"] for c in "abc") == 12
    # BatchNorm in train mode vs eval mode may flip a few labels; the counts must be consistent anyway.
    assert 0.0 <= summary["pseudo_acc"] <= 1.0
    assert int(task.epoch) == 1
    assert task.epoch_summary()["mask_rate"] == 0.0  # counters reset each epoch
    assert pseudo.shape == (12,)


def test_adaptive_thresholds_are_logged_and_checkpointed():
    task = tiny_task(thresholds=ClassAwareThreshold(3, init=0.9, eps=0.01))
    task.train()
    task(batch())
    summary = task.epoch_summary()
    assert {"threshold/a", "threshold/b", "threshold/c"} <= set(summary)
    state = task.state_dict()
    assert "thresholds.tau" in state and "ema.module.head.weight" in state and "epoch" in state


def test_predict_uses_the_ema_weights():
    task = tiny_task(ema_decay=0.5).eval()
    x = batch()["x"]
    with torch.no_grad():
        for p in task.model.parameters():
            p.add_(0.3)
    assert not torch.allclose(task.predict(x), task.model(task.model.backbone.to_unit(x)))
    assert torch.allclose(task.predict(x), task.ema.module(task.model.backbone.to_unit(x)))
    assert task.backbone is task.ema.module.backbone


def test_one_training_step_with_default_augmentations():
    torch.manual_seed(0)
    task = FixMatchTask(create_backbone("random:small_cnn@4", in_chans=1), 3, threshold=0.0)
    opt = torch.optim.SGD([p for p in task.parameters() if p.requires_grad], lr=0.1)
    out = task(batch())
    out["loss"].backward()
    opt.step()
    task.after_optimizer_step()
    assert torch.isfinite(out["loss"]) and out["loss_u"] > 0


def test_bad_arguments_are_named():
    with pytest.raises(ValueError, match="teacher_mode"):
        tiny_task(teacher_mode="sometimes")
    with pytest.raises(ValueError, match="threshold"):
        tiny_task(threshold=1.5)
