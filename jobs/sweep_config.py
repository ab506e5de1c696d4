"""Typed sweep configs, and the check that every search-space value is one the job accepts.

A sweep YAML names a base job config and a search space over any of its dotted keys::

    name: probe-lr
    base: jobs/configs/smoke_probe.yaml
    overrides: [train.epochs=3]          # fixed for every trial
    space:
      train.lr: {type: loguniform, low: 1.0e-3, high: 0.3}
      method.hidden: {type: choice, values: [0, 64]}
    metric: val_acc
    mode: max
    num_samples: 8
    max_concurrent: 2
    scheduler: {kind: asha, grace_period: 1, reduction_factor: 2}

Everything here is checked without Ray: :func:`load_sweep` applies each space key at its
``low``, ``high`` and each ``values`` entry as a dotted override to the base config and
parses the result with :func:`jobs.config.parse_config`, so an unknown key, an empty
range or a value the job rejects fails before any trial starts, naming the key.
"""

from __future__ import annotations

import copy
import os
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import Field, model_validator

from jobs.config import parse_config
from jobs.config_base import (
    ConfigError,
    SafeName,
    StrictModel,
    apply_overrides,
    get_dotted,
    read_yaml_mapping,
    set_dotted,
    validate,
)

PROJECT_ROOT = Path(__file__).resolve().parent.parent

#: Keys a sweep may not search over: they name the run and where it is stored.
FIXED_KEYS = ("name", "run")
#: Keys PBT may not mutate: a trial's schedule is built from them once (the architecture
#: keys of a method are caught when the cloned weights do not fit, naming the mismatch).
PBT_FIXED_KEYS = ("train.epochs", "train.steps_per_epoch", "train.warmup_epochs", "train.scheduler", "method.name",
                  "seed")
#: Value types Optuna's categorical distribution stores.
SCALAR_TYPES = (type(None), bool, int, float, str)


class SweepConfigError(ConfigError):
    """A sweep config is invalid; the message names the bad key."""


class ParamSpace(StrictModel):
    """One searched key: ``uniform``/``loguniform``/``int`` over ``[low, high]``, or ``choice`` of ``values``."""

    type: Literal["uniform", "loguniform", "int", "choice"]
    low: float | None = None
    high: float | None = None
    values: list[Any] | None = None

    @model_validator(mode="after")
    def _consistent(self) -> ParamSpace:
        if self.type == "choice":
            if self.low is not None or self.high is not None:
                raise ValueError("a choice takes `values`, not low/high")
            if not self.values:
                raise ValueError("a choice needs a non-empty `values` list")
            bad = [v for v in self.values if not isinstance(v, SCALAR_TYPES)]
            if bad:
                raise ValueError(f"choice values must be scalars (number, string, bool, null); got {bad!r}")
            if len({repr(v) for v in self.values}) != len(self.values):
                raise ValueError(f"choice values repeat: {self.values!r}")
            return self
        if self.values is not None:
            raise ValueError(f"a {self.type} range takes low/high, not `values`")
        if self.low is None or self.high is None:
            raise ValueError(f"a {self.type} range needs both low and high")
        if not self.low < self.high:
            raise ValueError(f"empty range: low={self.low!r} must be < high={self.high!r}")
        if self.type == "loguniform" and self.low <= 0:
            raise ValueError(f"loguniform needs low > 0 (got {self.low!r})")
        if self.type == "int" and (self.low != int(self.low) or self.high != int(self.high)):
            raise ValueError(f"int range needs whole numbers (got {self.low!r}, {self.high!r})")
        return self

    def probe_values(self) -> list[Any]:
        """The values validated against the job: both ends of a range, or every choice."""
        if self.type == "choice":
            return list(self.values or [])
        assert self.low is not None and self.high is not None
        if self.type == "int":
            return [int(self.low), int(self.high)]
        return [float(self.low), float(self.high)]

    def default_in_range(self, value: Any) -> bool:
        """Whether ``value`` (say, the base config's) lies inside this space."""
        if self.type == "choice":
            return value in (self.values or [])
        assert self.low is not None and self.high is not None
        return isinstance(value, (int, float)) and not isinstance(value, bool) and self.low <= value <= self.high


class AshaScheduler(StrictModel):
    """Asynchronous successive halving (Li et al. 2020) on the epoch counter."""

    kind: Literal["asha"] = "asha"
    grace_period: int = Field(1, ge=1, description="epochs every trial gets before it can be stopped")
    reduction_factor: float = Field(2.0, gt=1)
    max_t: int | None = Field(None, ge=1, description="default: the base config's train.epochs")
    brackets: int = Field(1, ge=1)


class PbtScheduler(StrictModel):
    """Population Based Training (Jaderberg et al. 2017): copy the best, perturb the params."""

    kind: Literal["pbt"] = "pbt"
    perturbation_interval: int = Field(1, ge=1, description="epochs between exploit/explore steps (each trial "
                                       "runs in segments of this many epochs, checkpointed to Tune in between)")
    quantile_fraction: float = Field(0.25, gt=0, le=0.5)
    resample_probability: float = Field(0.25, ge=0, le=1)


class NoScheduler(StrictModel):
    """Every trial runs to the end."""

    kind: Literal["none"] = "none"


SchedulerConfig = Annotated[AshaScheduler | PbtScheduler | NoScheduler, Field(discriminator="kind")]


class TrialResources(StrictModel):
    """What each trial asks for; ``None`` keeps the base config's ``scaling`` value."""

    num_workers: int | None = Field(None, gt=0)
    cpus_per_worker: float | None = Field(None, gt=0)
    use_gpu: bool | Literal["auto"] | None = None
    driver_cpus: float = Field(0.0, ge=0, description="CPUs of the Tune function itself (it only waits)")


class SweepConfig(StrictModel):
    """A whole sweep (see the module docstring for an example)."""

    name: SafeName
    base: str = Field(..., description="the base job YAML (absolute, or relative to the cwd or the project root)")
    overrides: list[str] = Field(default_factory=list, description="dotted key=value fixed for every trial")
    space: dict[str, ParamSpace] = Field(..., min_length=1)
    metric: str | None = None
    mode: Literal["min", "max"] | None = None
    metrics: list[str] | None = Field(None, min_length=2, description="several objectives (multi-objective TPE)")
    modes: list[Literal["min", "max"]] | None = None
    num_samples: int = Field(8, gt=0)
    max_concurrent: int = Field(2, gt=0)
    scheduler: SchedulerConfig = Field(default_factory=lambda: AshaScheduler.model_validate({}))
    resources: TrialResources = Field(default_factory=lambda: TrialResources.model_validate({}))
    points_to_evaluate: list[dict[str, Any]] = Field(default_factory=list,
                                                     description="configs tried first, e.g. the defaults")
    output_dir: str = "runs/sweeps"
    storage_path: str | None = Field(None, description="local dir or s3://...; default <output_dir>/<name>/ray")
    seed: int = 0

    @model_validator(mode="after")
    def _objectives(self) -> SweepConfig:
        if (self.metric is None) == (self.metrics is None):
            raise ValueError("give either metric+mode (one objective) or metrics+modes (several)")
        if self.metric is not None and self.mode is None:
            raise ValueError(f"metric {self.metric!r} needs a mode: min or max")
        if self.metrics is not None and (self.modes is None or len(self.modes) != len(self.metrics)):
            raise ValueError(f"metrics {self.metrics!r} need one mode each (got modes={self.modes!r})")
        if self.scheduler.kind == "pbt":
            if self.metrics is not None:
                raise ValueError(f"scheduler pbt ranks trials on one metric; got metrics {self.metrics!r} "
                                 "(use metric+mode, or scheduler asha for several objectives)")
            fixed = sorted(k for k in self.space if k in PBT_FIXED_KEYS)
            if fixed:
                raise ValueError(f"scheduler pbt cannot mutate {fixed} mid-training (they set the length and shape "
                                 "of the schedule); fix them with `overrides`, or use asha")
        return self

    @property
    def objectives(self) -> list[tuple[str, str]]:
        """``[(metric, mode), ...]``; the first one drives the scheduler and the best config."""
        if self.metric is not None:
            assert self.mode is not None
            return [(self.metric, self.mode)]
        assert self.metrics is not None and self.modes is not None
        return list(zip(self.metrics, self.modes))

    @property
    def sweep_dir(self) -> Path:
        return Path(self.output_dir) / self.name

    @property
    def resolved_storage(self) -> str:
        """Where Tune keeps the experiment (absolute for local paths)."""
        if self.storage_path is None:
            return str((self.sweep_dir / "ray").resolve())
        if "://" in self.storage_path:
            return self.storage_path.rstrip("/")
        return str(Path(self.storage_path).resolve())

    def dump(self) -> dict[str, Any]:
        """Plain dict without the unset optional keys (what ``sweep.yaml`` holds)."""
        return self.model_dump(mode="json", exclude_none=True)


def resolve_base_path(base: str, sweep_file: Path | None = None) -> Path:
    """The base job YAML: absolute, or relative to the cwd, the sweep file's folder, or the project root."""
    path = Path(base)
    candidates = [path] if path.is_absolute() else [Path.cwd() / path, *([sweep_file.parent / path] if sweep_file
                                                                          else []), PROJECT_ROOT / path]
    for candidate in candidates:
        if candidate.is_file():
            return candidate.resolve()
    raise SweepConfigError(f"base config {base!r} not found (looked in: {', '.join(map(str, candidates))})")


def parse_sweep(data: dict[str, Any]) -> SweepConfig:
    """Validate a sweep dict on its own (not yet against its base job).

    Raises:
        SweepConfigError: Naming each bad key.
    """
    return validate(SweepConfig, data, "invalid sweep config", SweepConfigError)


def base_job_data(sweep: SweepConfig, base_path: Path) -> dict[str, Any]:
    """The base job as a dict: its YAML, the sweep's fixed overrides and trial resources applied."""
    try:
        data = read_yaml_mapping(base_path, "base config")
        apply_overrides(data, list(sweep.overrides))
        res = sweep.resources
        for key, value in (("num_workers", res.num_workers), ("cpus_per_worker", res.cpus_per_worker),
                           ("use_gpu", res.use_gpu)):
            if value is not None:
                set_dotted(data, f"scaling.{key}", value)
        parse_config(data)
    except ConfigError as exc:
        raise SweepConfigError(f"base config {base_path} with the sweep's overrides: {exc}") from None
    return data


def validate_space(sweep: SweepConfig, base: dict[str, Any]) -> None:
    """Apply every space value (range ends, each choice) to the base job and parse it.

    Raises:
        SweepConfigError: Naming the first key whose value the job rejects, and why.
    """
    for key, space in sweep.space.items():
        if key.split(".")[0] in FIXED_KEYS or not all(key.split(".")):
            raise SweepConfigError(f"space key {key!r} cannot be searched (run names and paths are fixed)")
        for value in space.probe_values():
            data = copy.deepcopy(base)
            try:
                set_dotted(data, key, value)
                cfg = parse_config(data)
            except ConfigError as exc:
                raise SweepConfigError(f"space key {key!r}: the job rejects {value!r}: {exc}") from None
            got = get_dotted(cfg.dump(), key)
            if got != value and not (isinstance(got, (int, float)) and got == value):
                raise SweepConfigError(f"space key {key!r}: the job turned {value!r} into {got!r}")
    for i, point in enumerate(sweep.points_to_evaluate):
        unknown = sorted(set(point) - set(sweep.space))
        if unknown:
            raise SweepConfigError(f"points_to_evaluate[{i}]: keys {unknown} are not in the space "
                                   f"({', '.join(sweep.space)})")
        data = copy.deepcopy(base)
        try:
            for key, value in point.items():
                set_dotted(data, key, value)
            parse_config(data)
        except ConfigError as exc:
            raise SweepConfigError(f"points_to_evaluate[{i}]: the job rejects it: {exc}") from None


def load_sweep(path: str | os.PathLike[str], overrides: list[str] | None = None
               ) -> tuple[SweepConfig, dict[str, Any]]:
    """Read a sweep YAML (with dotted overrides of the sweep's own keys), validate it against its base job.

    Returns:
        The sweep config and the base job dict every trial starts from.

    Raises:
        SweepConfigError: Missing files, bad YAML, invalid keys or values, naming the key.
    """
    file = Path(path)
    try:
        data = apply_overrides(read_yaml_mapping(file, "sweep config"), overrides or [])
    except ConfigError as exc:
        raise SweepConfigError(str(exc)) from None
    sweep = parse_sweep(data)
    base = base_job_data(sweep, resolve_base_path(sweep.base, file))
    validate_space(sweep, base)
    if sweep.scheduler.kind == "pbt":
        epochs = parse_config(base).train.epochs
        if sweep.scheduler.perturbation_interval >= epochs:
            raise SweepConfigError(f"scheduler.perturbation_interval={sweep.scheduler.perturbation_interval} must "
                                   f"be below the job's train.epochs={epochs}, or PBT never perturbs")
    return sweep, base
