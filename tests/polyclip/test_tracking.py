"""Each tracker writes what it is given, read back with the tracker's own reader (offline)."""

import math
import time

import numpy as np
import pytest
import torch

from polyclip.tracking import TrackingCallback, build_loggers, scalars

CONFIG = {"name": "t", "train": {"lr": 0.1, "epochs": 2}, "run": {"loggers": ["tensorboard"]}}
EPOCHS = [{"epoch": 1, "train_loss": 1.5, "val_acc": 0.25, "note": "text"},
          {"epoch": 2, "train_loss": 0.75, "val_acc": 0.5, "bad": float("nan")}]


def _fit(loggers):
    callback = TrackingCallback(loggers)
    callback.on_fit_start(None)
    for metrics in EPOCHS:
        callback.on_step(None)
        callback.on_epoch_end(None, metrics)
    callback.on_fit_end(None)


def test_scalars_keep_finite_numbers_only():
    values = scalars({"a": 1, "b": np.float32(0.5), "c": torch.tensor(2.0), "d": True, "e": "x", "f": float("inf"),
                      "g": [1.0]})
    assert values == {"a": 1.0, "b": 0.5, "c": 2.0}


def test_unknown_or_repeated_logger_names_fail_naming_them(tmp_path):
    with pytest.raises(ValueError, match=r"unknown logger\(s\) \['comet'\]; valid: tensorboard, wandb, mlflow"):
        build_loggers(["tensorboard", "comet"], tmp_path, "run")
    with pytest.raises(ValueError, match=r"\['tensorboard'\] named more than once"):
        build_loggers(["tensorboard", "tensorboard"], tmp_path, "run")
    assert not (tmp_path / "tensorboard").exists()  # nothing was started


def test_tensorboard_events_read_back(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    _fit(build_loggers(["tensorboard"], tmp_path, "run", CONFIG))
    events = EventAccumulator(str(tmp_path / "tensorboard"))
    events.Reload()
    assert sorted(events.Tags()["scalars"]) == ["epoch", "train_loss", "val_acc"]
    loss = [(e.step, e.value) for e in events.Scalars("train_loss")]
    assert loss == [(1, 1.5), (2, 0.75)]
    assert [e.value for e in events.Scalars("val_acc")] == [0.25, 0.5]


def test_wandb_offline_run_is_written(tmp_path, monkeypatch):
    pytest.importorskip("wandb")
    monkeypatch.delenv("WANDB_MODE", raising=False)  # offline is the default
    monkeypatch.setenv("WANDB_SILENT", "true")
    loggers = build_loggers(["wandb"], tmp_path, "wandb-run", CONFIG)
    run_dir = loggers[0].run_dir  # type: ignore[attr-defined]
    _fit(loggers)
    assert run_dir.parent == tmp_path / "wandb" and run_dir.name.startswith("offline-run-")
    files = list(run_dir.glob("run-*.wandb"))
    assert len(files) == 1
    from wandb.proto import wandb_internal_pb2

    # W&B's service process writes the log behind finish(); wait until its exit record is on disk.
    deadline = time.monotonic() + 60
    while True:
        records = [wandb_internal_pb2.Record.FromString(data) for data in _wandb_records(files[0])]
        if any(r.WhichOneof("record_type") == "exit" for r in records) or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    history = [{item.key or "/".join(item.nested_key): item.value_json for item in r.history.item}
               for r in records if r.WhichOneof("record_type") == "history"]
    assert [float(h["train_loss"]) for h in history] == [1.5, 0.75]
    assert all("note" not in h and "bad" not in h for h in history)


def _wandb_records(path):
    """The protobuf records of a ``.wandb`` transaction log (W&B's header, then LevelDB's log format)."""
    data = path.read_bytes()
    assert data[:4] == b":W&B"
    block, pos, records, pending = 32768, 7, [], b""
    while pos + 7 <= len(data):
        left = block - pos % block
        if left < 7:  # a block's tail too short for a header is padding
            pos += left
            continue
        length, kind = int.from_bytes(data[pos + 4:pos + 6], "little"), data[pos + 6]
        chunk = data[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind == 1:  # FULL
            records.append(chunk)
        elif kind == 2:  # FIRST
            pending = chunk
        elif kind == 3:  # MIDDLE
            pending += chunk
        elif kind == 4:  # LAST
            records.append(pending + chunk)
    return records


def test_mlflow_file_store_metrics_and_params_read_back(tmp_path, monkeypatch):
    pytest.importorskip("mlflow")
    from mlflow import MlflowClient

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    loggers = build_loggers(["mlflow"], tmp_path, "mlflow-run", CONFIG)
    run_id = loggers[0].run_id  # type: ignore[attr-defined]
    _fit(loggers)
    client = MlflowClient(tracking_uri=f"file:{tmp_path / 'mlruns'}")
    run = client.get_run(run_id)
    assert run.info.run_name == "mlflow-run" and run.info.status == "FINISHED"
    assert run.data.params["train.lr"] == "0.1" and run.data.params["run.loggers"] == "['tensorboard']"
    history = client.get_metric_history(run_id, "train_loss")
    assert sorted((m.step, m.value) for m in history) == [(1, 1.5), (2, 0.75)]
    assert "bad" not in run.data.metrics and math.isclose(run.data.metrics["val_acc"], 0.5)


def test_all_three_together_close_cleanly(tmp_path, monkeypatch):
    pytest.importorskip("wandb")
    pytest.importorskip("mlflow")
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    loggers = build_loggers(["tensorboard", "wandb", "mlflow"], tmp_path, "all", CONFIG)
    _fit(loggers)
    for logger in loggers:
        logger.close()  # a second close is harmless
    assert {p.name for p in tmp_path.iterdir()} == {"tensorboard", "wandb", "mlruns"}


def _tiny_sweep(tmp_path, monkeypatch, loggers):
    """A real two-trial Tune run with jobs.sweep's callbacks for ``loggers``; its results."""
    from ray import tune

    from jobs.sweep import tune_logger_callbacks

    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    with pytest.raises(ValueError, match=r"unknown logger\(s\) \['neptune'\]"):
        tune_logger_callbacks(["neptune"], tmp_path, "s")

    def trial(config):
        for epoch in range(1, 3):
            tune.report({"epoch": epoch, "val_acc": config["lr"] * epoch})

    callbacks = tune_logger_callbacks(loggers, tmp_path / "sweep", "tiny-sweep")
    results = tune.Tuner(
        trial, param_space={"lr": tune.grid_search([0.1, 0.2])},
        run_config=tune.RunConfig(name="tiny-sweep", storage_path=str(tmp_path / "storage"), callbacks=callbacks),
    ).fit()
    assert not results.errors
    return results


def test_sweep_tensorboard_and_mlflow_callbacks_record_every_trial(ray_cluster, tmp_path, monkeypatch):
    """jobs.sweep's Tune callbacks for run.loggers, through a real Tune run."""
    pytest.importorskip("mlflow")
    from mlflow import MlflowClient
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    results = _tiny_sweep(tmp_path, monkeypatch, ["tensorboard", "mlflow"])
    # TensorBoard: events in each trial's folder.
    for result in results:
        events = EventAccumulator(result.path)
        events.Reload()
        lr = result.config["lr"]
        assert [round(e.value, 6) for e in events.Scalars("ray/tune/val_acc")] == [round(lr, 6), round(2 * lr, 6)]
    # MLflow: one run per trial in the sweep's experiment, with the trial's lr as a param.
    client = MlflowClient(tracking_uri=f"file:{(tmp_path / 'sweep' / 'mlruns').resolve()}")
    runs = client.search_runs([client.get_experiment_by_name("tiny-sweep").experiment_id])
    assert sorted(float(r.data.params["lr"]) for r in runs) == [0.1, 0.2]
    assert sorted(r.data.metrics["val_acc"] for r in runs) == pytest.approx([0.2, 0.4])


@pytest.mark.slow
def test_sweep_wandb_callback_writes_one_offline_run_per_trial(ray_cluster, tmp_path, monkeypatch):
    pytest.importorskip("wandb")
    _tiny_sweep(tmp_path, monkeypatch, ["wandb"])
    assert len(list((tmp_path / "sweep" / "wandb").glob("offline-run-*"))) == 2
