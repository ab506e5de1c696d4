"""Sweep any job's keys with Ray Tune and Optuna's TPE sampler, with ASHA early stopping.

Usage::

    python -m jobs.sweep --config jobs/configs/sweeps/probe_small.yaml [key=value ...] [--address ADDR] [--fresh]

The overrides set the sweep's own top-level keys (``num_samples=4``, ``name=try2``,
``scheduler.kind=none``). The sweep config and every search-space value are validated
against the base job before Ray starts (see :mod:`jobs.sweep_config`).

Each trial is one full ``TorchTrainer`` job with its own workers, run inside a Tune
function that reports each epoch through ``TuneReportCallback`` (the Train-in-Tune
pattern of Ray 2.60's Train V2). When ASHA stops a trial, Tune ends the trial's actor,
and with it the Train controller and workers that actor owns.

The driver prepares the job's data once and shares it with every trial through the
object store, unless the space touches a key that data preparation reads (``data.*``,
``seed``, the backbone of a feature probe, ...): then each trial prepares its own. Which
keys preparation reads is recorded while preparing, not guessed.

Re-running a sweep of the same name resumes it with ``Tuner.restore``: finished trials
are kept, unfinished ones restart (their Train runs resume from their last checkpoint).

Outputs under ``<output_dir>/<name>/``: ``best_config.yaml`` (runnable with
``python -m jobs.train --config``), ``trials.csv``, ``metric_per_trial.png``,
``param_effects.png``, ``summary.md``, ``sweep.yaml``; Tune's experiment (with
TensorBoard event files: ``tensorboard --logdir <storage_path>``) under the storage path.
The base job's ``run.loggers`` pick Tune's logger callbacks (:func:`tune_logger_callbacks`):
W&B runs go to ``wandb/`` and MLflow's file store to ``mlruns/`` in the sweep folder.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import logging
import os
import random
import re
import shutil
import sys
import time
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import yaml
from pydantic import BaseModel

from jobs.cli import job_parser, start_job
from jobs.config import parse_config
from jobs.runtime import init_ray
from jobs.sweep_config import SweepConfig, SweepConfigError, load_sweep, set_dotted
from jobs.sweep_report import (
    BEST_YAML,
    EFFECTS_PLOT,
    METRIC_PLOT,
    SUMMARY,
    TRIALS_CSV,
    TrialRecord,
    best_job,
    best_record,
    plot_metric_per_trial,
    plot_param_effects,
    trial_rows,
    write_best_yaml,
    write_trials_csv,
)
from polyclip.io import atomic_write_text
from polyclip.reports.tables import markdown_table

logger = logging.getLogger("polyclip")

SWEEP_FILE = "sweep.yaml"
#: Job keys that hold paths: made absolute, since Tune runs each trial in its own folder.
PATH_KEYS = ("run.output_dir", "run.feature_store", "data.root")
#: What Tune counts trials' progress in (the job reports its epoch; robust to restarts).
TIME_ATTR = "epoch"
#: Memory (bytes) a CPU-free trial function reserves, so that Tune accepts its resource request.
DRIVER_MEMORY = 256 * 1024**2
#: How long a trial's Train workers may wait for CPUs (Ray Train's default, 60 s, is too short on a busy cluster):
#: a trial may wait for the workers of one that ASHA just stopped to be torn down.
WORKER_START_TIMEOUT = {"RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S": "900"}
#: W&B runs offline unless WANDB_MODE says otherwise (Ray asks for an API key unless W&B is offline).
WANDB_MODE = "offline"
#: Tune's advice under PBT; a trial here is a Train run, not a Trainable that could reuse its actor.
PBT_ACTOR_REUSE_WARNING = "Consider boosting PBT performance"


@contextlib.contextmanager
def environ_defaults(values: dict[str, str]) -> Iterator[None]:
    """Set the variables of ``values`` that are not set already; remove them again on leaving.

    For settings that Ray and the trackers read only from the environment, scoped to the
    code that needs them (the process, a Ray worker, may run other work afterwards).
    """
    added = {key: value for key, value in values.items() if key not in os.environ}
    os.environ.update(added)
    try:
        yield
    finally:
        for key in added:
            os.environ.pop(key, None)


# --- which keys the driver's data preparation reads ---------------------------------------------


class _ReadRecorder:
    """Wraps a config section; records the dotted keys read through it.

    Reading a method (``model_dump()``, ...) of a section counts as reading all of it.
    """

    def __init__(self, obj: BaseModel, prefix: str, reads: set[str]) -> None:
        object.__setattr__(self, "_obj", obj)
        object.__setattr__(self, "_prefix", prefix)
        object.__setattr__(self, "_reads", reads)

    def __getattr__(self, name: str) -> Any:
        value = getattr(self._obj, name)
        path = f"{self._prefix}{name}"
        if isinstance(value, BaseModel):
            return _ReadRecorder(value, path + ".", self._reads)
        self._reads.add(path if name in type(self._obj).model_fields else self._prefix.rstrip(".") or "*")
        return value


def prepare_recording_reads(cfg: Any) -> tuple[Any, set[str]]:
    """Load the data and run the recipe's ``prepare`` for ``cfg``; return the payload and the keys read."""
    from jobs.data import load_data, prepare_payload

    reads: set[str] = set()
    recorder: Any = _ReadRecorder(cfg, "", reads)
    dataset, split = load_data(recorder)
    payload = prepare_payload(recorder, dataset, split, {})
    return payload, reads


def keys_touching(space_keys: list[str], reads: set[str]) -> list[str]:
    """Space keys that data preparation read (or that sit inside a section it read whole)."""
    def hit(key: str, read: str) -> bool:
        return read == "*" or key == read or key.startswith(read + ".") or read.startswith(key + ".")

    return [key for key in space_keys if any(hit(key, read) for read in reads)]


# --- the Tune side -----------------------------------------------------------------------------


def search_space(sweep: SweepConfig) -> dict[str, Any]:
    """Tune domains by dotted key (flat: Tune's nested-key separator is ``/``, so dots are safe)."""
    from ray import tune

    space: dict[str, Any] = {}
    for key, spec in sweep.space.items():
        if spec.type == "choice":
            space[key] = tune.choice(list(spec.values or []))
            continue
        assert spec.low is not None and spec.high is not None
        if spec.type == "uniform":
            space[key] = tune.uniform(spec.low, spec.high)
        elif spec.type == "loguniform":
            space[key] = tune.loguniform(spec.low, spec.high)
        else:
            space[key] = tune.randint(int(spec.low), int(spec.high) + 1)  # randint excludes its upper end
    return space


def build_search_alg(sweep: SweepConfig) -> Any:
    """Optuna's TPE sampler (seeded), multi-objective when the sweep has several metrics.

    Under PBT the population is drawn at random (seeded) instead: PBT itself moves the
    trials' values, which a model-based sampler would read as results of values never run.
    """
    import optuna
    from ray.tune.search import BasicVariantGenerator
    from ray.tune.search.optuna import OptunaSearch

    if sweep.scheduler.kind == "pbt":
        return BasicVariantGenerator(points_to_evaluate=[dict(p) for p in sweep.points_to_evaluate] or None,
                                     random_state=sweep.seed)

    objectives = sweep.objectives
    kwargs: dict[str, Any] = {"metric": objectives[0][0], "mode": objectives[0][1]}
    if len(objectives) > 1:
        kwargs = {"metric": [m for m, _ in objectives], "mode": [m for _, m in objectives]}
    return OptunaSearch(sampler=optuna.samplers.TPESampler(seed=sweep.seed),
                        points_to_evaluate=[dict(p) for p in sweep.points_to_evaluate] or None, **kwargs)


def build_scheduler(sweep: SweepConfig, max_epochs: int) -> Any:
    """ASHA on the epoch counter, PBT, or none."""
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler, PopulationBasedTraining

    metric, mode = sweep.objectives[0]
    sched = sweep.scheduler
    if sched.kind == "asha":
        # max_t one past the last epoch: a trial that reaches its end finishes by itself (final
        # checkpoint, workers shut down) instead of being stopped by ASHA at its last report.
        return ASHAScheduler(time_attr=TIME_ATTR, metric=metric, mode=mode, max_t=sched.max_t or max_epochs + 1,
                             grace_period=sched.grace_period, reduction_factor=sched.reduction_factor,
                             brackets=sched.brackets)
    if sched.kind == "pbt":
        # A choice moves to a neighbouring value (a list); a range is resampled or scaled by 0.8/1.2,
        # then clipped back into the space (ClipToSpace) so every mutated value is one the job accepts.
        space = search_space(sweep)
        mutations = {key: list(spec.values or []) if spec.type == "choice" else space[key]
                     for key, spec in sweep.space.items()}
        return PopulationBasedTraining(time_attr=TIME_ATTR, metric=metric, mode=mode,
                                       perturbation_interval=sched.perturbation_interval,
                                       hyperparam_mutations=mutations,
                                       quantile_fraction=sched.quantile_fraction,
                                       resample_probability=sched.resample_probability,
                                       custom_explore_fn=ClipToSpace(sweep), synch=False)
    return FIFOScheduler()


class ClipToSpace:
    """PBT's explore step scales ranges by 0.8 or 1.2; this puts values back inside ``[low, high]``."""

    def __init__(self, sweep: SweepConfig) -> None:
        self.ranges = {key: (spec.type, spec.low, spec.high) for key, spec in sweep.space.items()
                       if spec.type != "choice"}

    def __call__(self, config: dict[str, Any]) -> dict[str, Any]:
        for key, (kind, low, high) in self.ranges.items():
            if key in config:
                value = min(max(config[key], low), high)
                config[key] = round(value) if kind == "int" else float(value)
        return config


def trial_driver_resources(sweep: SweepConfig) -> dict[str, float]:
    """What the Tune function itself holds; its Train workers ask for their own CPUs.

    Tune refuses an all-zero request, so a CPU-free trial holds a little memory instead:
    on 2 CPUs, two trials of one 1-CPU worker each then run at once.
    """
    cpus = sweep.resources.driver_cpus
    return {"CPU": cpus} if cpus > 0 else {"CPU": 0, "memory": DRIVER_MEMORY}


def trial_job(job: dict[str, Any], params: dict[str, Any], name: str, train_storage: str) -> Any:
    """The job config of one trial: the base job, the trial's values, its own name and storage."""
    data = copy.deepcopy(job)
    for key, value in params.items():
        set_dotted(data, key, value)
    data["name"] = name
    data.setdefault("run", {})["storage_path"] = train_storage
    return parse_config(data)


def run_trial(config: dict[str, Any], *, job: dict[str, Any], shared: dict[str, Any], sweep_name: str,
              train_storage: str) -> None:
    """Tune function: one full ``TorchTrainer`` job; every epoch reaches Tune through ``TuneReportCallback``."""
    from ray.tune.integration.ray_train import TuneReportCallback

    from jobs.trainer import build_trainer

    cfg, ref, streamed = _start_trial(config, job, shared, sweep_name, train_storage)
    with environ_defaults(WORKER_START_TIMEOUT):
        build_trainer(cfg, ref, callbacks=[TuneReportCallback()], streamed=streamed).fit()


def _start_trial(config: dict[str, Any], job: dict[str, Any], shared: dict[str, Any], sweep_name: str,
                 train_storage: str) -> tuple[Any, Any, dict[str, Any]]:
    """A trial's job config (named after the trial), its payload's object ref and its streamed splits
    (shared by every trial, or prepared here)."""
    from ray import tune

    from jobs.data import load_data, prepare_payload
    from jobs.trainer import training_inputs

    # The trial id is stable across Tuner.restore, so a restarted trial resumes its Train run.
    cfg = trial_job(job, config, f"{sweep_name}-{tune.get_context().get_trial_id()}", train_storage)
    if "payload" in shared:
        return cfg, shared["payload"], shared["streamed"]
    dataset, split = load_data(cfg)
    ref, streamed = training_inputs(cfg, prepare_payload(cfg, dataset, split, {}))
    return cfg, ref, streamed


def _epochs_done(checkpoint: Any) -> int:
    """Epochs a Train checkpoint holds (its history has one entry per epoch)."""
    from jobs.trainer import HISTORY_FILE

    if checkpoint is None:
        return 0
    with checkpoint.as_directory() as folder:
        return len(json.loads((Path(folder) / HISTORY_FILE).read_text()))


def run_pbt_trial(config: dict[str, Any], *, job: dict[str, Any], shared: dict[str, Any], sweep_name: str,
                  train_storage: str, interval: int) -> None:
    """Tune function for PBT: the job in segments of ``interval`` epochs, each a ``TorchTrainer`` run.

    After each segment the trial reports the segment's last metrics together with its Train
    checkpoint, which Tune keeps. When PBT exploits, Tune restarts the trial with another
    trial's checkpoint (``tune.get_checkpoint()``) and mutated values: the next segment loads
    those weights and keeps its optimizer state and schedule position, with the new values
    (see :func:`jobs.trainer.load_training_state`). Each segment is a Train run named after
    the trial, its start epoch and what it starts from, so a restored sweep resumes a
    half-done segment from its own last epoch.
    """
    import hashlib

    from ray import tune

    from jobs.trainer import build_trainer

    cfg, ref, streamed = _start_trial(config, job, shared, sweep_name, train_storage)
    checkpoint = tune.get_checkpoint()
    start = _epochs_done(checkpoint)
    while start < cfg.train.epochs:
        stop = min(start + interval, cfg.train.epochs)
        origin = json.dumps([sorted(config.items()), getattr(checkpoint, "path", None)], default=str)
        digest = hashlib.sha1(origin.encode()).hexdigest()[:8]
        segment = cfg.model_copy(update={"name": f"{cfg.name}-e{start:03d}-{digest}"})
        with environ_defaults(WORKER_START_TIMEOUT):
            result = build_trainer(segment, ref, init_checkpoint=checkpoint, stop_after_epoch=stop,
                                   streamed=streamed).fit()
        checkpoint = result.checkpoint
        metrics = {k: v for k, v in (result.metrics or {}).items() if isinstance(v, (int, float))}
        metrics["checkpoint_path"] = checkpoint.path
        tune.report(metrics, checkpoint=checkpoint)
        start = stop


def _absolute_paths(job: dict[str, Any]) -> dict[str, Any]:
    data = copy.deepcopy(job)
    cfg = parse_config(data)
    for key in PATH_KEYS:
        section, _, leaf = key.partition(".")
        value = getattr(getattr(cfg, section), leaf)
        if isinstance(value, str) and "://" not in value:
            set_dotted(data, key, str(Path(value).resolve()))
    return data


def _test_top1(metrics: dict[str, Any]) -> float | None:
    """Test accuracy from a trial's final Train checkpoint (local storage; ``None`` if it did not finish)."""
    from jobs.trainer import PREDICTIONS_FILE

    path = metrics.get("checkpoint_path")
    if not isinstance(path, str) or not (Path(path) / PREDICTIONS_FILE).is_file():
        return None
    with np.load(Path(path) / PREDICTIONS_FILE) as data:
        return float((data["test_logits"].argmax(1) == data["test_labels"]).mean())


def collect_records(results: Any, space_keys: list[str]) -> list[TrialRecord]:
    """Tune's result grid as :class:`TrialRecord` s, in trial-creation order.

    A finished ``tuner.fit()`` leaves every trial terminated or errored (a trial ASHA stopped
    is terminated), so a result's status is whether it has an error.
    """
    records = []
    for result in results:
        metrics = dict(result.metrics or {})
        history = result.metrics_dataframe.to_dict("records") if result.metrics_dataframe is not None else []
        records.append(TrialRecord(
            trial_id=str(metrics.get("trial_id") or Path(result.path).name),
            params={k: result.config.get(k) for k in space_keys},
            metrics=metrics,
            epochs=int(metrics.get(TIME_ATTR, 0) or 0),
            status="ERROR" if result.error else "TERMINATED",
            test_top1=_test_top1(metrics),
            error=str(result.error).splitlines()[0] if result.error else None,
            history=history,
        ))
    # Creation order: Tune adds the trial's experiment tag, which starts with its number, to every
    # result ("3_train.lr=0.1", or "3@perturbed[...]" under PBT); a restore keeps it.
    def number(record: TrialRecord) -> tuple[int, str]:
        head = re.match(r"\d+", str(record.metrics.get("experiment_tag") or ""))
        return (int(head.group()) if head else len(records) + 1, record.trial_id)

    return sorted(records, key=number)


def _check_same_sweep(sweep: SweepConfig, stored: Path) -> None:
    if not stored.exists():
        return
    old = yaml.safe_load(stored.read_text())
    if old != sweep.dump():
        changed = sorted(k for k in set(old) | set(sweep.dump()) if old.get(k) != sweep.dump().get(k))
        raise SweepConfigError(f"sweep {sweep.name!r} exists in {stored.parent} with a different config "
                               f"({', '.join(changed)}); pick a new name, or pass --fresh to start over")


def _load_sweep(args: argparse.Namespace) -> tuple[SweepConfig, dict[str, Any]]:
    """The sweep and its base job; an existing sweep of the name must have the same config, unless ``--fresh``."""
    sweep, job = load_sweep(args.config, args.overrides)
    from jobs.train import check_trainable

    check_trainable(parse_config(job))  # an evaluation-only method has nothing to sweep
    if not args.fresh:
        _check_same_sweep(sweep, sweep.sweep_dir / SWEEP_FILE)
    return sweep, job


def run_sweep(sweep: SweepConfig, job: dict[str, Any], *, fresh: bool = False) -> dict[str, Any]:
    """Run (or resume) a validated sweep on the connected Ray cluster; write its outputs.

    Returns:
        ``{"best": {...}, "trials": [rows], "dir": str, "storage": str, "restored": bool,
        "shared_payload": bool, "seconds": float}``
    """
    from ray import tune

    t0 = time.perf_counter()
    sweep_dir = sweep.sweep_dir
    storage = sweep.resolved_storage
    experiment = f"{storage}/{sweep.name}"
    if fresh:
        if "://" in storage:
            raise SweepConfigError("--fresh with remote storage: delete the old sweep yourself or pick a new name")
        shutil.rmtree(experiment, ignore_errors=True)
        shutil.rmtree(f"{storage}/train", ignore_errors=True)
        (sweep_dir / SWEEP_FILE).unlink(missing_ok=True)
    _check_same_sweep(sweep, sweep_dir / SWEEP_FILE)
    sweep_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_text(sweep_dir / SWEEP_FILE, yaml.safe_dump(sweep.dump(), sort_keys=False))

    job_abs = _absolute_paths(job)
    base_cfg = parse_config(job_abs)
    payload, reads = prepare_recording_reads(base_cfg)
    touched = keys_touching(list(sweep.space), reads)
    shared: dict[str, Any] = {}
    if touched:
        logger.info("the space touches %s, which data preparation reads: each trial prepares its own data",
                    ", ".join(touched))
    else:
        sizes = {name: len(split["y"]) for name in ("train", "val", "test")
                 if isinstance(split := payload.split(name), dict) and "y" in split}
        from jobs.trainer import training_inputs

        shared["payload"], shared["streamed"] = training_inputs(base_cfg, payload)
        logger.info("data prepared once on the driver and shared by every trial (%s%s)",
                    ", ".join(f"{k}: {v}" for k, v in sizes.items()),
                    "".join(f", {k}: {s.num_rows} streamed" for k, s in shared["streamed"].items()))
    del payload

    common = {"job": job_abs, "shared": shared, "sweep_name": sweep.name, "train_storage": f"{storage}/train"}
    if sweep.scheduler.kind == "pbt":
        function = tune.with_parameters(run_pbt_trial, interval=sweep.scheduler.perturbation_interval, **common)
    else:
        function = tune.with_parameters(run_trial, **common)
    trainable = tune.with_resources(function, trial_driver_resources(sweep))
    restored = tune.Tuner.can_restore(experiment)
    if restored:
        logger.info("resuming sweep %r from %s", sweep.name, experiment)
        tuner = tune.Tuner.restore(experiment, trainable=trainable, resume_unfinished=True, restart_errored=True)
    else:
        # The searcher and the scheduler get their metrics themselves (Tune refuses both places).
        tuner = tune.Tuner(
            trainable,
            param_space=search_space(sweep),
            tune_config=tune.TuneConfig(
                search_alg=build_search_alg(sweep),
                scheduler=build_scheduler(sweep, base_cfg.train.epochs),
                num_samples=sweep.num_samples, max_concurrent_trials=sweep.max_concurrent,
            ),
            run_config=tune.RunConfig(name=sweep.name, storage_path=storage,
                                      failure_config=tune.FailureConfig(max_failures=0),
                                      callbacks=tune_logger_callbacks(base_cfg.run.loggers, sweep_dir, sweep.name)),
        )
    with while_tuning(sweep, base_cfg.run.loggers, sweep_dir):
        results = tuner.fit()
    records = collect_records(results, list(sweep.space))
    outputs = write_outputs(sweep, job, records, sweep_dir, experiment)
    outputs.update({"dir": str(sweep_dir.resolve()), "storage": experiment, "restored": restored,
                    "shared_payload": not touched, "seconds": round(time.perf_counter() - t0, 2)})
    atomic_write_text(sweep_dir / "result.json", json.dumps(outputs, indent=2, default=str))
    return outputs


@contextlib.contextmanager
def while_tuning(sweep: SweepConfig, loggers: list[str], log_dir: str | os.PathLike[str]) -> Iterator[None]:
    """The process-global settings Tune reads, set while ``tuner.fit()`` runs and restored after.

    The trackers' environment (:func:`tracking_environ`); under PBT, Python's ``random``
    seeded (PBT draws whom to clone and how to perturb from it, and takes no seed) and
    Tune's advice to reuse actors silenced (a trial here is a Train run, not a Trainable).
    """
    state = random.getstate()
    with environ_defaults(tracking_environ(loggers, log_dir)), warnings.catch_warnings():
        if sweep.scheduler.kind == "pbt":
            random.seed(sweep.seed)
            warnings.filterwarnings("ignore", message=PBT_ACTOR_REUSE_WARNING)
        try:
            yield
        finally:
            random.setstate(state)


def tune_logger_callbacks(names: list[str], log_dir: str | os.PathLike[str], experiment: str) -> list[Any]:
    """Tune's own logger callbacks for the base job's ``run.loggers`` (one run per trial).

    ``tensorboard``: ``TBXLoggerCallback`` (event files in each trial's folder under the
    storage path); ``wandb``: ``WandbLoggerCallback``, offline unless ``WANDB_MODE`` says
    otherwise, into ``<log_dir>/wandb``, grouped by sweep; ``mlflow``:
    ``MLflowLoggerCallback`` into ``MLFLOW_TRACKING_URI`` or the file store
    ``<log_dir>/mlruns``, one experiment per sweep. Both need :func:`tracking_environ`
    set while Tune runs.
    """
    from polyclip.tracking import LOGGER_NAMES, mlflow_tracking_uri

    unknown = [name for name in names if name not in LOGGER_NAMES]
    if unknown:
        raise ValueError(f"unknown logger(s) {unknown}; valid: {', '.join(LOGGER_NAMES)}")
    callbacks: list[Any] = []
    if "tensorboard" in names:
        from ray.tune.logger import TBXLoggerCallback

        callbacks.append(TBXLoggerCallback())
    if "wandb" in names:
        from ray.air.integrations.wandb import WandbLoggerCallback

        Path(log_dir).mkdir(parents=True, exist_ok=True)
        callbacks.append(WandbLoggerCallback(project=os.environ.get("WANDB_PROJECT", "polyclip"), group=experiment,
                                             mode=os.environ.get("WANDB_MODE", WANDB_MODE),
                                             dir=str(Path(log_dir).resolve())))
    if "mlflow" in names:
        from ray.air.integrations.mlflow import MLflowLoggerCallback

        callbacks.append(MLflowLoggerCallback(tracking_uri=mlflow_tracking_uri(log_dir), experiment_name=experiment))
    return callbacks


def tracking_environ(names: list[str], log_dir: str | os.PathLike[str]) -> dict[str, str]:
    """The environment :func:`tune_logger_callbacks` needs while Tune runs (defaults only: a set variable wins).

    W&B offline (Ray asks for an API key otherwise); MLflow's file store allowed (MLflow 3 asks for it).
    """
    from polyclip.tracking import mlflow_tracking_uri

    env = {}
    if "wandb" in names:
        env["WANDB_MODE"] = WANDB_MODE
    if "mlflow" in names and mlflow_tracking_uri(log_dir).startswith("file:"):
        env["MLFLOW_ALLOW_FILE_STORE"] = "true"
    return env


def pbt_perturbations(experiment: str) -> list[dict[str, Any]]:
    """PBT's exploit/explore log (``pbt_global.txt``): who cloned whom, at which epoch, with which values."""
    path = Path(experiment) / "pbt_global.txt"
    if "://" in experiment or not path.is_file():
        return []
    events = []
    for line in path.read_text().splitlines():
        # [trial tag, cloned trial tag, trial's report count, clone's report count, clone's config, new config]
        trial, cloned, at, _, old, values = json.loads(line)
        events.append({"trial_no": trial, "cloned_no": cloned, "at_report": at,
                       "cloned_values": dict(sorted(old.items())), "values": dict(sorted(values.items()))})
    return events


def write_outputs(sweep: SweepConfig, job: dict[str, Any], records: list[TrialRecord],
                  sweep_dir: Path, experiment: str | None = None) -> dict[str, Any]:
    """``trials.csv``, ``best_config.yaml``, the two plots and ``summary.md``."""
    objectives = sweep.objectives
    rows = trial_rows(records, objectives)
    write_trials_csv(rows, sweep_dir / TRIALS_CSV)
    plot_metric_per_trial(records, objectives, sweep_dir / METRIC_PLOT)
    plot_param_effects(records, sweep.space, objectives[0][0], sweep_dir / EFFECTS_PLOT)
    best = best_record(records, objectives)
    best_data = best_job(job, best.params, f"{sweep.name}-best")
    parse_config(best_data)  # what we write must run
    metric, mode = objectives[0]
    write_best_yaml(best_data, sweep_dir / BEST_YAML,
                    f"Best of sweep {sweep.name!r} on {metric} ({mode}): {best.metrics.get(metric)!r} "
                    f"(trial {best.trial_id}, {best.epochs} epochs).\n"
                    f"Run it: python -m jobs.train --config {sweep_dir / BEST_YAML}")
    columns = [c for c in rows[0] if c not in ("error",)] if rows else None
    summary = [f"# Sweep {sweep.name}", "", f"Base job: `{sweep.base}`; objective(s): "
               + ", ".join(f"{m} ({d})" for m, d in objectives) + f"; scheduler: {sweep.scheduler.kind}.", "",
               f"Best trial {best.trial_id}: " + ", ".join(f"`{k}={v!r}`" for k, v in best.params.items()), "",
               markdown_table(rows, columns=columns), "",
               f"![metric per trial]({METRIC_PLOT})", f"![parameter effects]({EFFECTS_PLOT})", ""]
    perturbations = pbt_perturbations(experiment) if experiment and sweep.scheduler.kind == "pbt" else []
    if sweep.scheduler.kind == "pbt":
        summary += ["## PBT", "", "Under PBT a trial's values change during training: `best_config.yaml` holds the "
                    "best trial's last values. Exploit/explore steps (trial `trial_no` took the weights of trial "
                    "`cloned_no` and its values, perturbed):", "",
                    markdown_table([{"trial_no": e["trial_no"], "cloned_no": e["cloned_no"],
                                     "at_report": e["at_report"], **e["values"],
                                     **{f"{k} (was)": v for k, v in e["cloned_values"].items()}}
                                    for e in perturbations]) if perturbations else "none happened", ""]
    atomic_write_text(sweep_dir / SUMMARY, "\n".join(summary))
    return {"best": {"trial_id": best.trial_id, "params": best.params, "metrics": {
        m: best.metrics.get(m) for m, _ in objectives}, "epochs": best.epochs, "test_top1": best.test_top1,
        "config": str(sweep_dir / BEST_YAML)}, "trials": rows, "perturbations": perturbations}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Entry point; returns the sweep's outputs (callable from tests)."""
    parser = job_parser("python -m jobs.sweep", __doc__, config_help="sweep YAML (see jobs/configs/sweeps/)",
                        overrides_help="key=value overrides of the sweep's own keys")
    parser.add_argument("--fresh", action="store_true", help="delete an earlier sweep of this name and start over")
    args, (sweep, job) = start_job(parser, argv, _load_sweep, connect=init_ray)
    outputs = run_sweep(sweep, job, fresh=args.fresh)
    print(markdown_table(outputs["trials"], columns=[c for c in outputs["trials"][0] if c != "error"]))
    print(f"best: {outputs['best']['params']} -> {outputs['best']['metrics']}")
    print(f"sweep directory: {outputs['dir']}\ntensorboard --logdir {outputs['storage']}")
    return outputs


if __name__ == "__main__":
    main(sys.argv[1:])
