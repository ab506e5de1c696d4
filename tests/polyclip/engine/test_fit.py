"""The one fit loop: exact resume, schedules, precision, callbacks, host-sync-free logging, sharded evaluation."""

from __future__ import annotations

import copy
import io
import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from polyclip.engine.fit import (
    Callback,
    EvalSet,
    FitSettings,
    TaskData,
    evaluate_sharded,
    fit,
    resolve_precision,
)
from polyclip.engine.streams import ArrayLoader


class NoisyProbe(nn.Module):
    """A small task that uses the torch RNG every step (dropout, noise), like augmentation does."""

    def __init__(self, dim: int = 6, classes: int = 3) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Linear(dim, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Dropout(0.2))
        self.head = nn.Linear(16, classes)

    def predict(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(x))

    def forward(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        x = batch["x"] + 0.05 * torch.randn_like(batch["x"])
        loss = nn.functional.cross_entropy(self.predict(x), batch["y"])
        out = {"loss": loss, "acc": (self.predict(x).argmax(1) == batch["y"]).float().mean()}
        if "u_x" in batch:
            out["loss"] = loss + 0.1 * self.predict(batch["u_x"]).softmax(1).max(1).values.mean()
        return out


def _data(n: int = 96, dim: int = 6, classes: int = 3, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    y = rng.integers(0, classes, n)
    x = (rng.normal(size=(n, dim)) + 2.0 * np.eye(classes, dim)[y]).astype(np.float32)
    return x, y.astype(np.int64)


def _task_data(seed: int = 0) -> TaskData:
    x, y = _data(seed=seed)
    vx, vy = _data(48, seed=seed + 1)
    streams = {"": ArrayLoader({"x": x, "y": y}, 16, seed=seed),
               "u_": ArrayLoader({"x": _data(200, seed=seed + 2)[0]}, 32, seed=seed + 1)}
    return TaskData(streams=streams, val=EvalSet(vx, vy), class_names=["a", "b", "c"])


SETTINGS = FitSettings(epochs=4, optimizer="adamw", lr=0.01, weight_decay=0.01, scheduler="cosine",
                       warmup_epochs=1, grad_clip=1.0, log_every_steps=4, seed=3, progress=False)


class Recorder(Callback):
    def __init__(self) -> None:
        self.events: list[tuple] = []
        self.states: dict[int, dict] = {}

    def on_fit_start(self, state):
        self.events.append(("start", state.epoch))

    def on_log(self, state, logs):
        self.events.append(("log", state.step, round(logs["lr"], 12)))

    def on_epoch_end(self, state, metrics):
        self.events.append(("epoch", state.epoch, "val_acc" in metrics))
        self.states[state.epoch] = copy.deepcopy(state.state_dict())

    def on_fit_end(self, state):
        self.events.append(("end", state.epoch))


def _through_disk(state: dict) -> dict:
    """A checkpoint's round trip, loaded the way the trainer loads it: no pickle."""
    buffer = io.BytesIO()
    torch.save(state, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=True)


def test_fit_learns_and_reports_history():
    torch.manual_seed(0)
    result = fit(NoisyProbe(), _task_data(), SETTINGS)
    assert [row["epoch"] for row in result.history] == [1, 2, 3, 4]
    assert result.history[-1]["val_acc"] > 0.8
    assert {"train_loss", "train_acc", "lr", "val_loss", "epoch_seconds", "train_images_per_s"} <= set(
        result.history[-1])
    assert result.state.step == 4 * 7  # one pass over the longest stream (200 pool images in batches of 32)


def test_resume_continues_bit_for_bit():
    """Stopped after epoch 2 and resumed from its (unpickled) checkpoint into a model built with another seed, the
    run ends with exactly the weights, optimiser state and history of the uninterrupted run."""
    torch.manual_seed(0)
    whole = Recorder()
    full = fit(NoisyProbe(), _task_data(), SETTINGS, [whole])

    torch.manual_seed(0)
    first = Recorder()
    fit(NoisyProbe(), _task_data(), dataclass_replace(SETTINGS, stop_after_epoch=2), [first])
    state = _through_disk(first.states[2])

    torch.manual_seed(123)  # another initialisation: everything must come from the checkpoint
    second = Recorder()
    resumed = fit(NoisyProbe(), _task_data(), SETTINGS, [second], resume=state)

    final, expected = resumed.state.module.state_dict(), full.state.module.state_dict()
    assert all(torch.equal(final[k], expected[k]) for k in expected)
    assert [row["train_loss"] for row in resumed.history] == [row["train_loss"] for row in full.history]
    assert resumed.history[-1]["val_loss"] == full.history[-1]["val_loss"]
    assert resumed.state.resumes == [2]
    assert second.events[0] == ("start", 2) and second.events[-1] == ("end", 4)
    # The learning rate continued on the same cosine curve.
    assert [e for e in second.events if e[0] == "log"] == [e for e in whole.events if e[0] == "log"][-len(
        [e for e in second.events if e[0] == "log"]):]


def dataclass_replace(settings: FitSettings, **changes) -> FitSettings:
    import dataclasses

    return dataclasses.replace(settings, **changes)


def test_resume_under_new_hyperparameters_rebases_the_schedule():
    """PBT: cloned weights and optimiser state, but this run's learning rate on the schedule's position."""
    torch.manual_seed(0)
    first = Recorder()
    fit(NoisyProbe(), _task_data(), dataclass_replace(SETTINGS, stop_after_epoch=2), [first])
    state = _through_disk(first.states[2])
    new = dataclass_replace(SETTINGS, lr=0.1, stop_after_epoch=3)
    result = fit(NoisyProbe(), _task_data(), new, resume=state)
    steps = result.state.steps_per_epoch
    schedule = result.state.scheduler
    assert schedule.base_lrs == [0.1] * len(schedule.base_lrs)
    assert result.state.optimizer.param_groups[0]["lr"] == pytest.approx(0.1 * schedule.lr_lambdas[0](3 * steps))
    assert result.state.optimizer.state  # Adam moments came along


def test_callbacks_run_in_order_and_logs_come_every_n_steps():
    rec = Recorder()
    fit(NoisyProbe(), _task_data(), dataclass_replace(SETTINGS, epochs=2, eval_every=2), [rec])
    kinds = [e[0] for e in rec.events]
    assert kinds[0] == "start" and kinds[-1] == "end"
    # 7 steps per epoch, logs every 4 steps: at steps 4 and 7 (the epoch's end), then 11 and 14.
    assert [e[1] for e in rec.events if e[0] == "log"] == [4, 7, 11, 14]
    assert [e for e in rec.events if e[0] == "epoch"] == [("epoch", 1, False), ("epoch", 2, True)]


def test_plateau_halves_the_rate_when_validation_stalls():
    class Frozen(NoisyProbe):
        def forward(self, batch):
            return {"loss": (self.head.weight * 0).sum() + self.head.bias.sum() * 0}

    result = fit(Frozen(), _task_data(), dataclass_replace(SETTINGS, epochs=6, scheduler="plateau", lr=0.01,
                                                             warmup_epochs=0, grad_clip=None, weight_decay=0))
    lrs = [row["lr"] for row in result.history]
    # ReduceLROnPlateau(patience=2) steps after each epoch: the rate in epoch 5 is halved.
    assert lrs[0] == 0.01 and result.state.optimizer.param_groups[0]["lr"] < 0.01


def test_cosine_schedule_reaches_zero():
    result = fit(NoisyProbe(), _task_data(), dataclass_replace(SETTINGS, epochs=2))
    assert result.state.optimizer.param_groups[0]["lr"] == pytest.approx(0.0, abs=1e-12)


def test_non_finite_loss_fails_with_the_step_window():
    class Exploding(NoisyProbe):
        def forward(self, batch):
            out = super().forward(batch)
            out["loss"] = out["loss"] * torch.tensor(float("inf"))
            return out

    class Errors:
        def __init__(self):
            self.seen = []

        def on_fit_error(self, state, error):
            self.seen.append(type(error).__name__)

    errors = Errors()
    with pytest.raises(FloatingPointError, match=r"between steps 1 and 4 of epoch 1"):
        fit(Exploding(), _task_data(), SETTINGS, [errors])
    assert errors.seen == ["FloatingPointError"]  # e.g. trackers close and flush what was logged


def test_precision_choice():
    cpu = torch.device("cpu")
    assert resolve_precision("auto", cpu) == (None, False)
    assert resolve_precision("bf16", cpu) == (torch.bfloat16, False)
    with pytest.raises(ValueError, match="fp16 needs a GPU"):
        resolve_precision("fp16", cpu)
    with pytest.raises(ValueError, match="unknown precision 'fp8'"):
        FitSettings(precision="fp8")


def test_bf16_autocast_trains_on_cpu():
    torch.manual_seed(0)
    result = fit(NoisyProbe(), _task_data(), dataclass_replace(SETTINGS, precision="bf16", epochs=3, lr=0.02))
    assert np.isfinite(result.history[-1]["train_loss"]) and result.history[-1]["val_acc"] > 0.7


def test_settings_from_config_reject_unknown_keys():
    assert FitSettings.from_config({"epochs": 2, "lr": 0.5}, seed=4).seed == 4
    with pytest.raises(ValueError, match="unknown train settings"):
        FitSettings.from_config({"epoch": 2})


def _eval_worker(rank: int, world: int, folder: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{folder}/store", rank=rank, world_size=world)
    torch.manual_seed(0)
    model = nn.Linear(5, 3)
    x = np.random.default_rng(1).normal(size=(23, 5)).astype(np.float32)  # 23 rows: the last shard is short
    logits = evaluate_sharded(model, x, device=torch.device("cpu"), batch_size=4, rank=rank, world=world)
    with torch.no_grad():
        expected = model(torch.from_numpy(x)).numpy()
    Path(folder, f"rank{rank}.json").write_text(json.dumps({"close": bool(np.allclose(logits, expected)),
                                                            "shape": list(logits.shape)}))
    dist.destroy_process_group()


def test_sharded_evaluation_gathers_every_row_in_order(tmp_path):
    mp.start_processes(_eval_worker, args=(3, str(tmp_path)), nprocs=3, start_method="spawn")
    for rank in range(3):
        result = json.loads((tmp_path / f"rank{rank}.json").read_text())
        assert result == {"close": True, "shape": [23, 3]}


def test_any_object_with_hooks_is_a_callback_and_tracking_writes_tensorboard(tmp_path):
    """Callbacks need not subclass Callback; the tracking callback gets one TensorBoard point per epoch."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from polyclip.tracking import TrackingCallback, build_loggers

    class OnlyEpochs:
        def __init__(self):
            self.epochs = []

        def on_epoch_end(self, state, metrics):
            self.epochs.append(metrics["epoch"])

    only = OnlyEpochs()
    tracking = TrackingCallback(build_loggers(["tensorboard"], tmp_path, "fit-test", {"lr": 0.01}))
    fit(NoisyProbe(), _task_data(), dataclass_replace(SETTINGS, epochs=3), [only, tracking])
    assert only.epochs == [1, 2, 3]
    events = EventAccumulator(str(tmp_path / "tensorboard"))
    events.Reload()
    assert [e.step for e in events.Scalars("val_acc")] == [1, 2, 3]
    assert len(events.Scalars("train_loss")) == 3
