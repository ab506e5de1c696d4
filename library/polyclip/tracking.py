"""Experiment trackers behind one interface: TensorBoard, Weights & Biases, MLflow.

``build_loggers(["tensorboard", "wandb", "mlflow"], log_dir, run_name, config)`` returns
one :class:`MetricLogger` per name, each with ``log(metrics, step)`` and ``close()``. The
training engine calls them through :class:`TrackingCallback`; nothing here imports Ray.

* ``tensorboard``: event files under ``<log_dir>/tensorboard`` (``torch.utils.tensorboard``).
* ``wandb``: a W&B run under ``<log_dir>/wandb``, offline unless ``WANDB_MODE`` says
  otherwise (``wandb sync <log_dir>/wandb/offline-run-*`` uploads it later).
* ``mlflow``: an MLflow run in ``MLFLOW_TRACKING_URI`` if set, else the file store
  ``file:<log_dir>/mlruns`` (``mlflow ui --backend-store-uri <log_dir>/mlruns``).

``wandb`` and ``mlflow`` come with the ``polyclip[tracking]`` extra and are imported only
when asked for.
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any, Protocol

#: Names :func:`build_loggers` accepts (the same as the job config's ``run.loggers``).
LOGGER_NAMES = ("tensorboard", "wandb", "mlflow")


class MetricLogger(Protocol):
    """What every tracker offers."""

    def log(self, metrics: Mapping[str, float], step: int) -> None:
        """Record scalar ``metrics`` at ``step`` (non-numbers and non-finite values are skipped)."""

    def close(self) -> None:
        """Flush and finish the run; calling it twice is harmless."""


def scalars(metrics: Mapping[str, Any]) -> dict[str, float]:
    """The finite real numbers of ``metrics`` as floats (booleans, strings, lists and NaN dropped)."""
    out = {}
    for key, value in metrics.items():
        if isinstance(value, bool) or (not isinstance(value, (int, float)) and not hasattr(value, "item")):
            continue
        try:
            number = float(value)
        except (TypeError, ValueError):
            continue
        if math.isfinite(number):
            out[str(key)] = number
    return out


def flatten_config(config: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{"train": {"lr": 0.1}}`` -> ``{"train.lr": 0.1}`` (lists and other values become strings)."""
    out: dict[str, Any] = {}
    for key, value in config.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            out.update(flatten_config(value, name + "."))
        elif value is None or isinstance(value, (bool, int, float, str)):
            out[name] = value
        else:
            out[name] = str(value)
    return out


class TensorBoardLogger:
    """Scalars into TensorBoard event files; the config as a text summary at step 0.

    Args:
        log_dir: Folder of the event files.
        config: Recorded once, as a ``config`` text summary.
    """

    def __init__(self, log_dir: str | os.PathLike[str], config: Mapping[str, Any] | None = None) -> None:
        from torch.utils.tensorboard import SummaryWriter

        self.log_dir = Path(log_dir)
        self._writer: Any = SummaryWriter(log_dir=str(self.log_dir))
        if config:
            lines = [f"| {k} | {v} |" for k, v in flatten_config(config).items()]
            self._writer.add_text("config", "\n".join(["| key | value |", "| --- | --- |", *lines]), 0)

    def log(self, metrics: Mapping[str, float], step: int) -> None:
        for key, value in scalars(metrics).items():
            self._writer.add_scalar(key, value, int(step))
        self._writer.flush()

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = None


class WandbLogger:
    """A W&B run, offline by default (``WANDB_MODE`` overrides).

    Args:
        log_dir: W&B writes its ``wandb/`` folder here.
        run_name: The run's display name.
        config: The run's config (shown in the W&B UI).
        project: W&B project (``WANDB_PROJECT``, else ``polyclip``).
    """

    def __init__(self, log_dir: str | os.PathLike[str], run_name: str, config: Mapping[str, Any] | None = None,
                 project: str | None = None) -> None:
        try:
            import wandb
        except ImportError as exc:
            raise ImportError("run.loggers names 'wandb', which is not installed: "
                              "pip install 'polyclip[tracking]'") from exc
        self.log_dir = Path(log_dir)
        self.log_dir.mkdir(parents=True, exist_ok=True)
        self._run: Any = wandb.init(
            project=project or os.environ.get("WANDB_PROJECT", "polyclip"), name=run_name, dir=str(self.log_dir),
            config=dict(config or {}), mode=os.environ.get("WANDB_MODE", "offline"),  # type: ignore[arg-type]
            reinit="create_new",  # several runs (and trials) may share one process
        )

    @property
    def run_dir(self) -> Path:
        """The run's own folder (``<log_dir>/wandb/offline-run-<time>-<id>``)."""
        return Path(self._run.dir).parent

    def log(self, metrics: Mapping[str, float], step: int) -> None:
        values = scalars(metrics)
        if values:
            self._run.log(values, step=int(step))

    def close(self) -> None:
        if self._run is not None:
            self._run.finish()
            self._run = None


class MlflowLogger:
    """An MLflow run through :class:`mlflow.MlflowClient` (no global active run is touched).

    Args:
        tracking_uri: ``file:<folder>`` for a local file store, or a server's URL.
        run_name: The run's name.
        config: Logged as the run's params (flattened, dotted keys).
        experiment: Experiment name (``MLFLOW_EXPERIMENT_NAME``, else ``polyclip``).
    """

    def __init__(self, tracking_uri: str, run_name: str, config: Mapping[str, Any] | None = None,
                 experiment: str | None = None) -> None:
        try:
            from mlflow import MlflowClient
        except ImportError as exc:
            raise ImportError("run.loggers names 'mlflow', which is not installed: "
                              "pip install 'polyclip[tracking]'") from exc
        self.tracking_uri = tracking_uri
        if tracking_uri.startswith("file:"):
            # MLflow 3 refuses the file store unless told it is wanted; polyclip wants it (no server needed).
            os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
        self.client = MlflowClient(tracking_uri=tracking_uri)
        name = experiment or os.environ.get("MLFLOW_EXPERIMENT_NAME", "polyclip")
        found = self.client.get_experiment_by_name(name)
        self.experiment_id = found.experiment_id if found is not None else self.client.create_experiment(name)
        self.run_id: str | None = self.client.create_run(self.experiment_id, run_name=run_name).info.run_id
        params = flatten_config(config or {})
        if params:
            from mlflow.entities import Param

            # MLflow caps a param value at 6000 characters and a batch at 100 params.
            items = [Param(k, str(v)[:6000]) for k, v in params.items()]
            for start in range(0, len(items), 100):
                self.client.log_batch(self.run_id, params=items[start:start + 100])

    def log(self, metrics: Mapping[str, float], step: int) -> None:
        import time

        from mlflow.entities import Metric

        values = scalars(metrics)
        if values and self.run_id is not None:
            now = int(time.time() * 1000)
            self.client.log_batch(self.run_id, metrics=[Metric(k, v, now, int(step)) for k, v in values.items()])

    def close(self) -> None:
        if self.run_id is not None:
            self.client.set_terminated(self.run_id)
            self.run_id = None


def mlflow_tracking_uri(log_dir: str | os.PathLike[str]) -> str:
    """``MLFLOW_TRACKING_URI`` if set, else the file store ``file:<log_dir>/mlruns``."""
    return os.environ.get("MLFLOW_TRACKING_URI") or f"file:{Path(log_dir).resolve() / 'mlruns'}"


def build_loggers(names: Sequence[str], log_dir: str | os.PathLike[str], run_name: str,
                  config: Mapping[str, Any] | None = None) -> list[MetricLogger]:
    """One logger per name, all writing under ``log_dir``.

    Args:
        names: Any of ``tensorboard``, ``wandb``, ``mlflow`` (the job config's ``run.loggers``).
        log_dir: The run's folder: TensorBoard writes ``<log_dir>/tensorboard``, W&B
            ``<log_dir>/wandb``, MLflow ``<log_dir>/mlruns`` (unless ``MLFLOW_TRACKING_URI``).
        run_name: The run's name in W&B and MLflow.
        config: The run's settings, recorded by each tracker.

    Returns:
        The loggers, in the order named. If one fails to start, those already started
        are closed before the error propagates.

    Raises:
        ValueError: An unknown or repeated name.
        ImportError: ``wandb`` or ``mlflow`` is named but not installed.

    Example:
        >>> import tempfile
        >>> with tempfile.TemporaryDirectory() as folder:
        ...     loggers = build_loggers(["tensorboard"], folder, "demo", {"lr": 0.1})
        ...     for logger in loggers:
        ...         logger.log({"train_loss": 0.5}, step=1)
        ...         logger.close()
    """
    unknown = [name for name in names if name not in LOGGER_NAMES]
    if unknown:
        raise ValueError(f"unknown logger(s) {unknown}; valid: {', '.join(LOGGER_NAMES)}")
    repeated = sorted({name for name in names if list(names).count(name) > 1})
    if repeated:
        raise ValueError(f"logger(s) {repeated} named more than once in {list(names)}")
    root = Path(log_dir)
    loggers: list[MetricLogger] = []
    try:
        for name in names:
            if name == "tensorboard":
                loggers.append(TensorBoardLogger(root / "tensorboard", config))
            elif name == "wandb":
                loggers.append(WandbLogger(root, run_name, config))
            else:
                loggers.append(MlflowLogger(mlflow_tracking_uri(root), run_name, config))
    except BaseException:
        close_all(loggers)
        raise
    return loggers


def close_all(loggers: Iterable[MetricLogger]) -> None:
    """Close every logger, even if one of them fails (the first error is raised afterwards)."""
    error: BaseException | None = None
    for logger in loggers:
        try:
            logger.close()
        except Exception as exc:
            error = error or exc
    if error is not None:
        raise error


class TrackingCallback:
    """Feeds the training engine's metrics to loggers (the engine's callback interface).

    Per-epoch metrics are logged at the epoch number (``metrics["epoch"]`` when present,
    else ``state.epoch``); the loggers are closed at the end of the fit.

    Args:
        loggers: From :func:`build_loggers`.
    """

    def __init__(self, loggers: Sequence[MetricLogger]) -> None:
        self.loggers = list(loggers)

    def on_fit_start(self, state: Any) -> None:
        """Nothing to do: the loggers started when built."""

    def on_step(self, state: Any) -> None:
        """Per-step values are not logged (one point per epoch keeps the files small)."""

    def on_epoch_end(self, state: Any, metrics: Mapping[str, Any]) -> None:
        """Log the epoch's scalar metrics at the epoch number."""
        step = metrics.get("epoch", getattr(state, "epoch", 0))
        for logger in self.loggers:
            logger.log(metrics, int(step))

    def on_fit_end(self, state: Any) -> None:
        """Close every logger."""
        close_all(self.loggers)

    def on_fit_error(self, state: Any, error: BaseException) -> None:
        """Training failed: close every logger, so what was logged is flushed."""
        close_all(self.loggers)


__all__ = [
    "LOGGER_NAMES",
    "MetricLogger",
    "MlflowLogger",
    "TensorBoardLogger",
    "TrackingCallback",
    "WandbLogger",
    "build_loggers",
    "close_all",
    "flatten_config",
    "mlflow_tracking_uri",
    "scalars",
]
