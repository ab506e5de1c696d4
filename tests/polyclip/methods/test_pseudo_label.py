"""Teacher pseudo-labels: threshold schedules, the per-class report, the task, the teachers."""

import numpy as np
import pytest
import torch
from torch import nn

from polyclip.backbones import create_backbone
from polyclip.distributed import CollectiveDeviceError, check_devices
from polyclip.methods.pseudo_label import AcceptanceMeter, PseudoLabelTask, ThresholdSchedule, pseudo_label_report
from polyclip.methods.teacher import fit_probe_teacher, zero_shot_teacher


def test_constant_schedule():
    schedule = ThresholdSchedule(0.98)
    assert [schedule(e) for e in range(4)] == [0.98] * 4 and schedule.values() == [0.98]


def test_linear_schedule_over_epochs():
    schedule = ThresholdSchedule(0.98, 0.90, epochs=5, kind="linear")
    assert [schedule(e) for e in range(6)] == pytest.approx([0.98, 0.96, 0.94, 0.92, 0.90, 0.90])
    assert schedule.values() == pytest.approx([0.98, 0.96, 0.94, 0.92, 0.90])
    assert ThresholdSchedule(0.9, 0.5, epochs=1, kind="linear")(0) == 0.9


@pytest.mark.parametrize("kwargs,match", [({"start": 1.2}, "thresholds"), ({"start": 0.9, "kind": "linear"}, "end"),
                                          ({"start": 0.9, "kind": "cubic"}, "cubic")])
def test_bad_schedules_are_named(kwargs, match):
    with pytest.raises(ValueError, match=match):
        ThresholdSchedule(**kwargs)


def test_report_per_class_precision_and_never_passing():
    probs = np.array([
        [0.99, 0.01, 0.00],  # accepted as 0, true 0
        [0.99, 0.00, 0.01],  # accepted as 0, true 1 (wrong)
        [0.01, 0.99, 0.00],  # accepted as 1, true 1
        [0.40, 0.30, 0.30],  # not confident
        [0.10, 0.10, 0.80],  # class 2 below 0.98: never passes at 0.98
    ])
    labels = np.array([0, 1, 1, 2, 2])
    report = pseudo_label_report(probs, labels, ["a", "b", "c"], [0.98, 0.5])
    strict, lenient = report["thresholds"]
    assert report["teacher_accuracy"] == pytest.approx(3 / 5)
    assert strict["accepted"] == 3 and strict["precision"] == pytest.approx(2 / 3)
    assert strict["per_class"]["a"] == {"accepted": 2, "precision": 0.5, "recall": 1.0}
    assert strict["per_class"]["b"] == {"accepted": 1, "precision": 1.0, "recall": 0.5}
    assert strict["per_class"]["c"]["accepted"] == 0 and strict["per_class"]["c"]["precision"] is None
    assert strict["never_passing"] == ["c"]
    assert lenient["never_passing"] == [] and lenient["per_class"]["c"]["precision"] == 1.0
    with pytest.raises(ValueError, match="teacher_probs"):
        pseudo_label_report(probs[:, :2], labels, ["a", "b", "c"], [0.9])


def test_acceptance_meter():
    meter = AcceptanceMeter(["a", "b"], prefix="t_")
    meter.update(torch.tensor([0, 1, 1, 0]), torch.tensor([True, True, False, False]), torch.tensor([0, 0, 1, 0]))
    out = meter.summary()
    assert out == {"t_mask_rate": 0.5, "t_pseudo_acc": 0.5, "t_accepted/a": 1.0, "t_accepted/b": 1.0}
    assert meter.summary()["t_mask_rate"] == 0.0


def test_acceptance_meter_counts_on_the_batch_device():
    # Meta stands in for a GPU: the counters must follow the batch there and be reduced
    # there; a CPU counter (or a host read per step) would fail as it would under NCCL.
    meter = AcceptanceMeter(["a", "b", "c"])
    labels = torch.zeros(5, dtype=torch.long, device="meta")
    mask = torch.ones(5, dtype=torch.bool, device="meta")
    meter.update(labels, mask, labels)
    seen, accepted, correct = meter.reduced_counts()
    assert {t.device.type for t in (seen, accepted, correct, meter.seen)} == {"meta"}
    # Reduced tensors pass the same check a collective applies; a CPU copy does not.
    check_devices("all_reduce", [accepted], torch.device("meta"))
    with pytest.raises(CollectiveDeviceError, match="training device is meta"):
        check_devices("all_reduce", [accepted.new_zeros(3, device="cpu")], torch.device("meta"))
    meter.reset()
    assert meter.accepted.device.type == "meta"  # reset keeps the batches' device


def pl_batch(seed=0):
    g = torch.Generator().manual_seed(seed)
    return {"x": torch.randint(0, 256, (4, 1, 28, 28), dtype=torch.uint8, generator=g),
            "y": torch.randint(0, 3, (4,), generator=g),
            "u_x": torch.randint(0, 256, (8, 1, 28, 28), dtype=torch.uint8, generator=g),
            "u_y": torch.randint(0, 3, (8,), generator=g),
            "u_teacher_y": torch.randint(0, 3, (8,), generator=g),
            "u_teacher_conf": torch.linspace(0.9, 1.0, 8)}


def test_pseudo_label_task_masks_by_the_scheduled_threshold():
    torch.manual_seed(0)
    task = PseudoLabelTask(create_backbone("random:small_cnn@4", in_chans=1), 3,
                           schedule=ThresholdSchedule(0.99, 0.9, epochs=2, kind="linear"), ema_decay=None).eval()
    b = pl_batch()
    logits_u = task.model(task.model.backbone.to_unit(b["u_x"]))
    per_image = nn.functional.cross_entropy(logits_u, b["u_teacher_y"], reduction="none")
    for epoch, tau in ((0, 0.99), (1, 0.9)):
        task.epoch.fill_(epoch)
        keep = b["u_teacher_conf"] >= tau
        out = task(b)
        assert torch.allclose(out["loss_p"], per_image[keep].mean(), atol=1e-6)
        # True labels of the pool do not change the loss.
        assert torch.equal(out["loss"], task(dict(b, u_y=b["u_y"].flip(0)))["loss"])
    task.train()
    task(b)
    summary = task.epoch_summary()
    assert summary["teacher_threshold"] == pytest.approx(0.9) and summary["teacher_mask_rate"] == 1.0


def test_pseudo_label_task_without_a_pool_is_the_supervised_baseline():
    task = PseudoLabelTask(create_backbone("random:small_cnn@4", in_chans=1), 3, pseudo_labels=False)
    b = {k: v for k, v in pl_batch().items() if not k.startswith("u_")}
    out = task(b)
    assert set(out) == {"loss", "acc"} and task.epoch_summary() == {}


def test_pseudo_label_task_names_a_missing_pool_stream():
    task = PseudoLabelTask(create_backbone("random:small_cnn@4", in_chans=1), 3)
    b = {k: v for k, v in pl_batch().items() if not k.startswith("u_")}
    with pytest.raises(KeyError, match="u_x"):
        task(b)


def test_probe_teacher_labels_separable_clusters():
    rng = np.random.default_rng(0)
    centres = rng.normal(size=(3, 16)) * 4
    train_y, pool_y = np.repeat(np.arange(3), 4), np.repeat(np.arange(3), 50)
    train_x = centres[train_y] + rng.normal(size=(12, 16))
    pool_x = centres[pool_y] + rng.normal(size=(150, 16))
    probs = fit_probe_teacher(train_x, train_y, pool_x, 3, l2_reg=1e-4)
    assert probs.shape == (150, 3) and np.allclose(probs.sum(1), 1, atol=1e-5)
    assert (probs.argmax(1) == pool_y).mean() > 0.95
    looser = fit_probe_teacher(train_x, train_y, pool_x, 3, l2_reg=1e-1)
    assert probs.max(1).mean() > looser.max(1).mean()  # the penalty sets the confidence
    with pytest.raises(ValueError, match="labels must lie"):
        fit_probe_teacher(train_x, train_y + 3, pool_x, 3)


def test_zero_shot_teacher_needs_a_text_encoder():
    with pytest.raises(TypeError, match="text encoder"):
        zero_shot_teacher(create_backbone("pixels"), ["a", "b"], np.zeros((2, 784), np.float32))
