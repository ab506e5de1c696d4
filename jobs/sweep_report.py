"""What a finished sweep leaves behind: trials CSV, best job YAML, plots, summary (no Ray here).

Each trial is a plain :class:`TrialRecord`; the sweep driver builds them from Tune's
result grid, and everything below is a function of the records, the search space and
the objectives.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np
import yaml

from jobs.sweep_config import ParamSpace, set_dotted
from polyclip.io import atomic_write_text

TRIALS_CSV = "trials.csv"
BEST_YAML = "best_config.yaml"
METRIC_PLOT = "metric_per_trial.png"
EFFECTS_PLOT = "param_effects.png"
SUMMARY = "summary.md"


@dataclass
class TrialRecord:
    """One trial as the report sees it.

    Attributes:
        trial_id: Tune's trial id.
        params: The searched values, by dotted key.
        metrics: The last reported metrics.
        epochs: Epochs the trial trained (fewer than the job's if the scheduler stopped it).
        status: ``TERMINATED``, ``ERROR``, ...
        test_top1: Test accuracy from the final checkpoint (``None`` if the trial did not finish).
        error: The error text of a failed trial.
        history: Every reported result, in order.
    """

    trial_id: str
    params: dict[str, Any]
    metrics: dict[str, Any]
    epochs: int
    status: str
    test_top1: float | None = None
    error: str | None = None
    history: list[dict[str, Any]] = field(default_factory=list)


def _value(record: TrialRecord, metric: str) -> float:
    value = record.metrics.get(metric)
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else math.nan


def pareto_mask(values: np.ndarray, modes: Sequence[str]) -> np.ndarray:
    """Rows of ``values`` (trials x objectives) that no other row dominates; NaN rows never are."""
    signs = np.array([1.0 if m == "max" else -1.0 for m in modes])
    score = values * signs  # larger is better in every column
    valid = ~np.isnan(score).any(axis=1)
    mask = np.zeros(len(score), dtype=bool)
    for i in np.flatnonzero(valid):
        others = score[valid]
        dominated = ((others >= score[i]).all(axis=1) & (others > score[i]).any(axis=1)).any()
        mask[i] = not dominated
    return mask


def best_record(records: Sequence[TrialRecord], objectives: Sequence[tuple[str, str]]) -> TrialRecord:
    """The best trial on the first objective (among the Pareto front when there are several).

    Raises:
        RuntimeError: No trial reported the metric.
    """
    metric, mode = objectives[0]
    front = pareto_mask(np.array([[_value(r, m) for m, _ in objectives] for r in records]).reshape(
        len(records), len(objectives)), [m for _, m in objectives])
    candidates = [r for r, keep in zip(records, front) if keep]
    if not candidates:
        raise RuntimeError(f"no trial reported {metric!r}; statuses: {[r.status for r in records]}")
    sign = 1.0 if mode == "max" else -1.0
    # Ties go to the trial that trained longest, then to the earliest.
    return max(candidates, key=lambda r: (sign * _value(r, metric), r.epochs))


def trial_rows(records: Sequence[TrialRecord], objectives: Sequence[tuple[str, str]]) -> list[dict[str, Any]]:
    """One flat row per trial, for the CSV and the summary table."""
    front = pareto_mask(np.array([[_value(r, m) for m, _ in objectives] for r in records]).reshape(
        len(records), len(objectives)), [m for _, m in objectives])
    rows = []
    for record, on_front in zip(records, front):
        row: dict[str, Any] = {"trial_id": record.trial_id, "status": record.status, "epochs": record.epochs}
        row.update({f"param.{k}": v for k, v in record.params.items()})
        row.update({metric: _value(record, metric) for metric, _ in objectives})
        for key in ("val_acc", "val_loss", "train_loss", "time_total_s"):
            if key not in row and key in record.metrics:
                row[key] = record.metrics[key]
        row["test_top1"] = record.test_top1
        if len(objectives) > 1:
            row["pareto"] = bool(on_front)
        row["error"] = record.error
        rows.append(row)
    return rows


def write_trials_csv(rows: Sequence[Mapping[str, Any]], path: Path) -> Path:
    import pandas as pd

    atomic_write_text(path, pd.DataFrame(list(rows)).to_csv(index=False))
    return path


def best_job(base: dict[str, Any], params: Mapping[str, Any], name: str) -> dict[str, Any]:
    """The base job with the best values set: a config for ``python -m jobs.train``."""
    data = copy.deepcopy(base)
    for key, value in params.items():
        set_dotted(data, key, value)
    data["name"] = name
    return data


def write_best_yaml(data: dict[str, Any], path: Path, comment: str) -> Path:
    text = "".join(f"# {line}\n" for line in comment.splitlines()) + yaml.safe_dump(data, sort_keys=False)
    atomic_write_text(path, text)
    return path


def plot_metric_per_trial(records: Sequence[TrialRecord], objectives: Sequence[tuple[str, str]],
                          path: Path) -> Path:
    """Each objective per trial (in trial order), finished vs stopped early, with the running best."""
    fig, axes = plt.subplots(1, len(objectives), figsize=(6 * len(objectives), 4), squeeze=False)
    max_epochs = max((r.epochs for r in records), default=0)
    for ax, (metric, mode) in zip(axes[0], objectives):
        values = np.array([_value(r, metric) for r in records])
        x = np.arange(1, len(records) + 1)
        full = np.array([r.epochs == max_epochs for r in records])
        ax.scatter(x[full], values[full], label="ran to the end", color="#4c72b0", zorder=3)
        ax.scatter(x[~full], values[~full], label="stopped early", color="#dd8452", marker="x", zorder=3)
        filled = np.where(np.isnan(values), -np.inf if mode == "max" else np.inf, values)
        running = np.maximum.accumulate(filled) if mode == "max" else np.minimum.accumulate(filled)
        ax.step(x, np.where(np.isinf(running), np.nan, running), where="post", color="gray", label="best so far")
        ax.set_xlabel("trial (in order of creation)")
        ax.set_ylabel(f"{metric} (last reported)")
        ax.set_title(f"{metric} per trial ({mode})")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_param_effects(records: Sequence[TrialRecord], space: Mapping[str, ParamSpace], metric: str,
                       path: Path) -> Path:
    """One panel per searched key: the metric against the key's value."""
    keys = list(space)
    cols = min(3, len(keys))
    rows = math.ceil(len(keys) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.5 * cols, 3.5 * rows), squeeze=False)
    values = np.array([_value(r, metric) for r in records])
    for ax, key in zip(axes.flat, keys):
        spec = space[key]
        xs = [r.params.get(key) for r in records]
        if spec.type == "choice":
            labels = [repr(v) if not isinstance(v, str) else v for v in (spec.values or [])]
            index = {repr(v): i for i, v in enumerate(spec.values or [])}
            pos = np.array([index.get(repr(x), np.nan) for x in xs], dtype=float)
            jitter = np.random.default_rng(0).uniform(-0.08, 0.08, len(pos))
            ax.scatter(pos + jitter, values, alpha=0.8)
            ax.set_xticks(range(len(labels)), labels, rotation=20)
        else:
            ax.scatter(np.array(xs, dtype=float), values, alpha=0.8)
            if spec.type == "loguniform":
                ax.set_xscale("log")
        ax.set_xlabel(key)
        ax.set_ylabel(metric)
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(keys):]:
        ax.set_visible(False)
    fig.suptitle(f"effect of each searched key on {metric}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
