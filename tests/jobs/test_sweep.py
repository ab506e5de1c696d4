"""Sweep configs: every shipped preset validates; bad spaces fail before Ray, naming the key; one e2e sweep."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import yaml

from jobs import sweep as sweep_job
from jobs.config import load_config, parse_config
from jobs.sweep_config import SweepConfigError, load_sweep
from jobs.sweep_report import TrialRecord, best_record, pareto_mask

ROOT = Path(__file__).resolve().parents[2]
PRESETS = sorted((ROOT / "jobs" / "configs" / "sweeps").glob("*.yaml"))
SMOKE = str(ROOT / "jobs" / "configs" / "smoke_probe.yaml")


def _write(tmp_path: Path, **fields) -> Path:
    data = {"name": "s", "base": SMOKE, "space": {"train.lr": {"type": "loguniform", "low": 1e-3, "high": 0.1}},
            "metric": "val_acc", "mode": "max", "num_samples": 2, "output_dir": str(tmp_path / "out")}
    data.update(fields)
    path = tmp_path / "sweep.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def test_presets_exist_in_pairs():
    names = {p.stem for p in PRESETS}
    assert names, "no sweep presets shipped"
    for name in names:
        stem = name.rsplit("_", 1)[0]
        assert {f"{stem}_small", f"{stem}_full"} <= names, name


@pytest.mark.parametrize("path", PRESETS, ids=lambda p: p.name)
def test_every_shipped_sweep_validates(path):
    sweep, base = load_sweep(path)
    assert sweep.name and sweep.space
    cfg = parse_config(base)
    assert cfg.method.name
    for point in sweep.points_to_evaluate:
        assert set(point) <= set(sweep.space)


def test_valid_sweep_loads_with_overrides(tmp_path):
    sweep, base = load_sweep(_write(tmp_path, overrides=["train.epochs=2"], resources={"num_workers": 1}),
                             ["num_samples=5"])
    assert sweep.num_samples == 5 and base["train"]["epochs"] == 2 and base["scaling"]["num_workers"] == 1
    assert sweep.objectives == [("val_acc", "max")]


@pytest.mark.parametrize(("space", "match"), [
    ({"train.lrr": {"type": "uniform", "low": 0.1, "high": 0.2}}, r"space key 'train.lrr'.*unknown key 'train.lrr'"),
    ({"method.hiden": {"type": "int", "low": 1, "high": 4}}, r"space key 'method.hiden'.*hidden"),
    ({"train.lr": {"type": "uniform", "low": 0.2, "high": 0.2}}, r"space key 'train.lr'.*empty range"),
    ({"train.lr": {"type": "uniform", "low": 0.3, "high": 0.1}}, r"space key 'train.lr'.*empty range"),
    ({"train.lr": {"type": "loguniform", "low": 0.0, "high": 0.1}}, r"space key 'train.lr'.*low > 0"),
    ({"train.optimizer": {"type": "choice", "values": ["adam", "rmsprop"]}},
     r"space key 'train.optimizer'.*rejects 'rmsprop'"),
    ({"train.epochs": {"type": "int", "low": 0, "high": 3}}, r"space key 'train.epochs'.*rejects 0"),
    ({"train.lr": {"type": "choice", "values": []}}, r"space key 'train.lr'.*non-empty"),
    ({"method.dropout": {"type": "uniform", "low": 0.5, "high": 1.5}}, r"space key 'method.dropout'.*rejects 1.5"),
    ({"run.output_dir": {"type": "choice", "values": ["a", "b"]}}, r"space key 'run.output_dir' cannot"),
    ({"seed.x": {"type": "int", "low": 1, "high": 3}}, r"space key 'seed.x'.*'seed' is a value"),
])
def test_bad_space_fails_naming_the_key_before_ray(tmp_path, monkeypatch, space, match):
    def no_ray(*args, **kwargs):
        raise AssertionError("Ray was started for an invalid sweep")

    monkeypatch.setattr(sweep_job, "init_ray", no_ray)
    with pytest.raises(SystemExit, match="(?s)" + match):
        sweep_job.main(["--config", str(_write(tmp_path, space=space))])


def test_objectives_and_points_are_checked(tmp_path):
    with pytest.raises(SweepConfigError, match="metric 'val_acc' needs a mode"):
        load_sweep(_write(tmp_path, mode=None))
    with pytest.raises(SweepConfigError, match="need one mode each"):
        load_sweep(_write(tmp_path, metric=None, mode=None, metrics=["val_acc", "val_loss"], modes=["max"]))
    with pytest.raises(SweepConfigError, match=r"points_to_evaluate\[0\].*train.wd"):
        load_sweep(_write(tmp_path, points_to_evaluate=[{"train.wd": 0.1}]))
    with pytest.raises(SweepConfigError, match="scheduler"):
        load_sweep(_write(tmp_path, scheduler={"kind": "hyperband"}))
    with pytest.raises(SweepConfigError, match=r"base config 'nope\.yaml' not found"):
        load_sweep(_write(tmp_path, base="nope.yaml"))


def test_pbt_is_checked_before_ray(tmp_path):
    pbt = {"kind": "pbt", "perturbation_interval": 1}
    sweep, _ = load_sweep(_write(tmp_path, scheduler=pbt, overrides=["train.epochs=3"]))
    assert sweep.scheduler.kind == "pbt"
    with pytest.raises(SweepConfigError, match="pbt ranks trials on one metric"):
        load_sweep(_write(tmp_path, scheduler=pbt, metric=None, mode=None, metrics=["val_acc", "val_loss"],
                          modes=["max", "min"]))
    with pytest.raises(SweepConfigError, match=r"cannot mutate \['train.epochs'\]"):
        load_sweep(_write(tmp_path, scheduler=pbt, space={"train.epochs": {"type": "int", "low": 2, "high": 4}}))
    with pytest.raises(SweepConfigError, match=r"perturbation_interval=3 must be below the job's train\.epochs=3"):
        load_sweep(_write(tmp_path, scheduler={**pbt, "perturbation_interval": 3}, overrides=["train.epochs=3"]))


def test_pbt_mutations_stay_inside_the_space(tmp_path):
    sweep, _ = load_sweep(_write(tmp_path, scheduler={"kind": "pbt", "perturbation_interval": 1},
                                 overrides=["train.epochs=3"],
                                 space={"train.lr": {"type": "loguniform", "low": 1e-3, "high": 0.1},
                                        "train.batch_size": {"type": "int", "low": 8, "high": 64},
                                        "method.hidden": {"type": "choice", "values": [0, 16]}}))
    clip = sweep_job.ClipToSpace(sweep)
    assert clip({"train.lr": 0.12, "train.batch_size": 70.4, "method.hidden": 16}) == \
        {"train.lr": 0.1, "train.batch_size": 64, "method.hidden": 16}
    assert clip({"train.lr": 5e-4, "train.batch_size": 9.6, "method.hidden": 0})["train.batch_size"] == 10
    scheduler = sweep_job.build_scheduler(sweep, 3)
    # A choice moves along its list (never multiplied); ranges are Tune domains.
    assert scheduler._hyperparam_mutations["method.hidden"] == [0, 16]
    assert scheduler._custom_explore_fn is not None
    from ray.tune.search import BasicVariantGenerator

    assert isinstance(sweep_job.build_search_alg(sweep), BasicVariantGenerator)


def test_pbt_log_is_read_into_the_summary(tmp_path):
    # One line of Tune's pbt_global.txt: tags, report counts, the clone's config, the new config.
    (tmp_path / "pbt_global.txt").write_text(json.dumps(["0", "1", 2, 3, {"train.lr": 0.1}, {"train.lr": 0.12}]) + "\n")
    events = sweep_job.pbt_perturbations(str(tmp_path))
    assert events == [{"trial_no": "0", "cloned_no": "1", "at_report": 2, "cloned_values": {"train.lr": 0.1},
                       "values": {"train.lr": 0.12}}]
    assert sweep_job.pbt_perturbations(str(tmp_path / "missing")) == []


def test_pareto_front_and_best_record():
    values = np.array([[0.9, 3.0], [0.8, 1.0], [0.7, 2.0], [np.nan, 0.5]])
    assert pareto_mask(values, ["max", "min"]).tolist() == [True, True, False, False]
    records = [TrialRecord(str(i), {"k": i}, {"acc": v[0], "dist": v[1]}, 3, "TERMINATED")
               for i, v in enumerate(values)]
    assert best_record(records, [("acc", "max"), ("dist", "min")]).trial_id == "0"
    assert best_record(records, [("dist", "min")]).trial_id == "3"


def test_space_keys_read_by_data_preparation():
    reads = {"data.dataset", "seed", "backbone.spec", "method.name"}
    touched = sweep_job.keys_touching(["train.lr", "backbone.spec", "data.labels_per_class", "method.hidden"],
                                      reads | {"data.labels_per_class"})
    assert touched == ["backbone.spec", "data.labels_per_class"]
    assert sweep_job.keys_touching(["method.hidden"], {"method"}) == ["method.hidden"]


def test_sweep_settings_of_the_process_are_scoped_and_restored(tmp_path, monkeypatch):
    import os
    import random
    import warnings

    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.setenv("RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S", "5")
    with sweep_job.environ_defaults({**sweep_job.WORKER_START_TIMEOUT, "WANDB_MODE": "offline"}):
        assert os.environ["WANDB_MODE"] == "offline"
        assert os.environ["RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S"] == "5"  # a value set by the user wins
    assert "WANDB_MODE" not in os.environ and os.environ["RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S"] == "5"

    sweep, _ = load_sweep(_write(tmp_path, scheduler={"kind": "pbt", "perturbation_interval": 1},
                                 overrides=["train.epochs=3"]))
    random.seed(123)
    expected_next = random.Random(123).random()
    filters = list(warnings.filters)
    with sweep_job.while_tuning(sweep, ["wandb"], tmp_path):
        assert random.random() == random.Random(sweep.seed).random()  # PBT's draws are seeded
        assert os.environ["WANDB_MODE"] == "offline"
        action, message, *_ = warnings.filters[0]
        assert action == "ignore" and message.match(sweep_job.PBT_ACTOR_REUSE_WARNING + " by enabling")
    assert random.random() == expected_next and warnings.filters == filters and "WANDB_MODE" not in os.environ


def test_records_come_from_public_results_in_creation_order():
    import pandas as pd

    class Result:  # what ray.tune.Result offers: metrics, config, path, error, metrics_dataframe
        def __init__(self, trial_id, tag, error=None):
            self.metrics = {"trial_id": trial_id, "experiment_tag": tag, "epoch": 2, "val_acc": 0.5}
            self.config = {"train.lr": 0.1, "other": 1}
            self.path = f"/storage/s/run_trial_{trial_id}"
            self.error = error
            self.metrics_dataframe = pd.DataFrame([{"epoch": 1}, {"epoch": 2}])

    results = [Result("b", "10_train.lr=0.1"), Result("a", "2@perturbed[train.lr=0.2]"),
               Result("c", "3_train.lr=0.3", error=RuntimeError("worker died\ntraceback"))]
    records = sweep_job.collect_records(results, ["train.lr"])
    assert [r.trial_id for r in records] == ["a", "c", "b"]
    assert [r.status for r in records] == ["TERMINATED", "ERROR", "TERMINATED"]
    assert records[1].error == "worker died" and records[0].params == {"train.lr": 0.1}
    assert records[0].history == [{"epoch": 1}, {"epoch": 2}] and records[0].epochs == 2


# Opt-in: two 3-trial sweeps take 70-110 s on 2 cores, which would add a third to the default
# suite; the unit tests above (space validation, payload sharing, reports) run by default.
@pytest.mark.slow
@pytest.mark.timeout(1800)
def test_sweep_asha_outputs_then_restore(ray_cluster, tmp_path):
    path = _write(tmp_path, name="smoke-sweep", overrides=["train.epochs=3", "data.synthetic_size=300"],
                  space={"train.lr": {"type": "loguniform", "low": 1e-3, "high": 0.3},
                         "method.hidden": {"type": "choice", "values": [0, 16]}},
                  num_samples=3, max_concurrent=2, resources={"num_workers": 1},
                  scheduler={"kind": "asha", "grace_period": 1, "reduction_factor": 2})
    out = sweep_job.main(["--config", str(path)])
    sweep_dir = tmp_path / "out" / "smoke-sweep"
    assert out["shared_payload"] and not out["restored"]
    rows = out["trials"]
    assert len(rows) == 3 and all(r["status"] == "TERMINATED" for r in rows)
    assert all(1 <= r["epochs"] <= 3 for r in rows) and max(r["epochs"] for r in rows) == 3
    for name in ("trials.csv", "best_config.yaml", "metric_per_trial.png", "param_effects.png", "summary.md"):
        assert (sweep_dir / name).stat().st_size > 0, name
    import pandas as pd

    csv = pd.read_csv(sweep_dir / "trials.csv")
    assert len(csv) == 3 and {"param.train.lr", "param.method.hidden", "val_acc", "test_top1"} <= set(csv.columns)
    best = load_config(sweep_dir / "best_config.yaml")
    assert best.name == "smoke-sweep-best"
    assert best.train.lr == pytest.approx(out["best"]["params"]["train.lr"])
    assert out["best"]["metrics"]["val_acc"] == max(r["val_acc"] for r in rows if r["epochs"] == r["epochs"])
    assert list(Path(out["storage"]).rglob("events.out.tfevents*")), "no TensorBoard logs"

    # Same name again: Tuner.restore finds every trial finished and runs none of them again.
    again = sweep_job.main(["--config", str(path)])
    assert again["restored"]
    assert [(r["trial_id"], r["epochs"], r["val_acc"]) for r in again["trials"]] == \
        [(r["trial_id"], r["epochs"], r["val_acc"]) for r in rows]


@pytest.mark.slow
@pytest.mark.timeout(1800)
def test_sweep_pbt_clones_weights_and_mutates_values(ray_cluster, tmp_path):
    path = _write(tmp_path, name="pbt-sweep", overrides=["train.epochs=4", "data.synthetic_size=300"],
                  space={"train.lr": {"type": "loguniform", "low": 1e-4, "high": 0.3}},
                  points_to_evaluate=[{"train.lr": 1e-4}, {"train.lr": 0.1}],
                  num_samples=2, max_concurrent=2, resources={"num_workers": 1},
                  scheduler={"kind": "pbt", "perturbation_interval": 1, "quantile_fraction": 0.5,
                             "resample_probability": 0.0})
    out = sweep_job.main(["--config", str(path)])
    rows = out["trials"]
    assert len(rows) == 2 and all(r["status"] == "TERMINATED" and r["epochs"] == 4 for r in rows), rows
    # The trial at lr=1e-4 learns far less per epoch, so PBT makes it take the other's weights
    # and a perturbed lr (0.8x or 1.2x of 0.1, clipped to the space) at least once.
    events = out["perturbations"]
    assert events, "PBT never exploited"
    for event in events:  # no resampling: the clone's value times 0.8 or 1.2, inside the space
        ratio = event["values"]["train.lr"] / event["cloned_values"]["train.lr"]
        assert ratio == pytest.approx(0.8) or ratio == pytest.approx(1.2), event
    assert [r["trial_id"] for r in rows] == sorted(r["trial_id"] for r in rows)
    assert "## PBT" in (tmp_path / "out" / "pbt-sweep" / "summary.md").read_text()
    assert all(r["test_top1"] is not None for r in rows)
    # The weights really were cloned: the exploiting trial's final history starts with epochs
    # the other trial trained (same losses), then goes its own way.
    def final_history(trial_id):
        runs = Path(out["storage"]).parent.joinpath("train").glob(f"pbt-sweep-{trial_id}-e003-*")
        last = max((c for run in runs for c in run.glob("checkpoint_*") if c.is_dir()), key=lambda c: c.name)
        return json.loads((last / "history.json").read_text())

    first = events[0]
    ids = {int(r["trial_id"].rsplit("_", 1)[1]): r["trial_id"] for r in rows}
    taker, donor = final_history(ids[int(first["trial_no"])]), final_history(ids[int(first["cloned_no"])])
    assert len(taker) == len(donor) == 4
    assert taker[0]["train_loss"] == pytest.approx(donor[0]["train_loss"])
    assert taker[-1]["train_loss"] != pytest.approx(donor[-1]["train_loss"])
