"""SimCLR transfer comparison: pretrained encoder vs random init vs ImageNet backbones.

Usage::

    python -m jobs.simclr_comparison --config jobs/configs/simclr/comparison.yaml [dotted.key=value ...]
        [--address ADDR]

Pretrains SimCLR (the ``pretrain`` job config) unless ``encoder:`` names a finished one,
then runs every (backbone, labels per class, mode) cell through :func:`jobs.train.run_job`
on one Ray instance: ``mode`` is ``finetune`` (all layers, Adam, ``ReduceLROnPlateau``)
or ``probe`` (linear, on cached features of the frozen encoder). Dotted overrides apply
to every job. Writes ``comparison.md`` (one table), ``comparison.png`` (one plot) and
``comparison.json`` into ``<output_dir>/<name>/``, beside each job's run directory.

Encoders are frozen into content-addressed folders (``encoders/<kind>-<sha>/``) before
use: a ``checkpoint:`` spec then names exactly one set of weights, so the feature cache
(keyed by spec) can never serve features of an older pretraining, and the random-init
baseline is one seeded set of weights shared by every worker and both modes.
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
import sys
from pathlib import Path
from typing import Any, Literal

import torch
import yaml
from pydantic import Field, field_validator

from jobs.cli import job_parser, start_job
from jobs.config import JobConfig, load_config
from jobs.config_base import ConfigError, SafeName, StrictModel, read_yaml_mapping, validate
from jobs.runtime import init_ray
from polyclip.backbones import create_backbone, save_backbone
from polyclip.io import atomic_write_json, atomic_write_text
from polyclip.reports.plots import grouped_bar_chart
from polyclip.reports.tables import markdown_table

logger = logging.getLogger("polyclip")

#: Placeholder specs in ``backbones``: the pretrained SimCLR encoder, and its architecture at random init.
SIMCLR, RANDOM = "simclr", "random"


class BackboneEntry(StrictModel):
    """One row group of the comparison."""

    label: str
    spec: str = Field(description="'simclr', 'random', or any backbone spec")
    overrides: list[str] = Field(default_factory=list, description="dotted overrides for this backbone's jobs")


class ComparisonRuns(StrictModel):
    """The job configs the grid is made of."""

    pretrain: str = Field(description="the SimCLR pretraining job config")
    probe: str = Field(description="the linear-probe job config (its backbone.spec is replaced)")
    finetune: str = Field(description="the fine-tuning job config (its backbone.spec is replaced)")


class CellOverrides(StrictModel):
    """Dotted overrides for the cells of one mode (and label budget), e.g. fewer fine-tuning epochs with all labels."""

    mode: Literal["finetune", "probe"]
    labels_per_class: int | None = Field(None, description="only at this budget (-1 = all labels); default: every")
    overrides: list[str] = Field(min_length=1)


class ComparisonConfig(StrictModel):
    """The comparison grid (paths are relative to the comparison file)."""

    name: SafeName = "simclr-comparison"
    output_dir: str = "runs"
    runs: ComparisonRuns
    encoder: str | None = Field(None, description="a finished SimCLR checkpoint dir: skip pretraining")
    labels_per_class: list[int] = Field(default_factory=lambda: [10, -1], min_length=1)
    backbones: list[BackboneEntry] = Field(min_length=1)
    modes: list[Literal["finetune", "probe"]] = Field(default=["finetune", "probe"], min_length=1)
    overrides: list[str] = Field(default_factory=list)
    cell_overrides: list[CellOverrides] = Field(default_factory=list,
                                                description="overrides of some cells, applied after `overrides`")

    @field_validator("labels_per_class")
    @classmethod
    def _valid_k(cls, value: list[int]) -> list[int]:
        bad = [k for k in value if k == 0 or k < -1]
        if bad:
            raise ValueError(f"labels_per_class values must be >= 1 or -1, got {bad}")
        return value

    @property
    def folder(self) -> Path:
        return Path(self.output_dir) / self.name


def _resolve(base: Path, path: str) -> Path:
    return Path(path) if Path(path).is_absolute() else base / path


def load_comparison(path: str | Path, overrides: list[str] | None = None) -> tuple[ComparisonConfig, JobConfig]:
    """Read and validate the comparison and its pretraining job (before any Ray work).

    Returns:
        The comparison and the pretraining job config (writing under the comparison's folder).

    Raises:
        ConfigError: Bad keys or values, a missing job config, or an invalid job.
    """
    file = Path(path)
    data = read_yaml_mapping(file, "comparison config")
    comparison = validate(ComparisonConfig, data, f"{file}: invalid comparison config")
    base = file.parent
    runs = ComparisonRuns(**{k: str(_resolve(base, v)) for k, v in comparison.runs.model_dump().items()})
    comparison = comparison.model_copy(update={"runs": runs, "overrides": [*comparison.overrides, *(overrides or [])]})
    pretrain = load_config(runs.pretrain, [*comparison.overrides, f"run.output_dir={comparison.folder}"])
    if pretrain.method.name != "simclr":
        raise ConfigError(f"{runs.pretrain}: the pretraining job must have method.name simclr, "
                          f"got {pretrain.method.name!r}")
    for mode in comparison.modes:  # fail now, not after an hour of pretraining
        for entry in comparison.backbones:
            for k in comparison.labels_per_class:
                job_overrides(comparison, entry, mode, k, "checkpoint:/placeholder")
    return comparison, pretrain


def job_overrides(comparison: ComparisonConfig, entry: BackboneEntry, mode: str, k: int, spec: str) -> JobConfig:
    """The job config of one cell of the grid."""
    slug = "".join(c if c.isalnum() else "-" for c in entry.label.lower()).strip("-")
    labels = "all" if k < 0 else f"k{k}"
    cell = [o for c in comparison.cell_overrides if c.mode == mode and c.labels_per_class in (None, k)
            for o in c.overrides]
    return load_config(getattr(comparison.runs, mode), [
        *comparison.overrides, *cell, f"name={slug}-{mode}-{labels}", f"run.output_dir={comparison.folder}",
        f"backbone.spec={spec}", f"data.labels_per_class={k}", *entry.overrides,
    ])


def freeze_encoder(source: Path, folder: Path, kind: str) -> str:
    """Copy a saved encoder into ``folder/<kind>-<sha of its weights>``; return its ``checkpoint:`` spec."""
    digest = hashlib.sha256((source / "backbone.pt").read_bytes()).hexdigest()[:12]
    target = folder / f"{kind}-{digest}"
    if not (target / "backbone.json").exists():
        shutil.copytree(source, target, dirs_exist_ok=True)
    return f"checkpoint:{target.resolve()}"


def simclr_encoder(comparison: ComparisonConfig, pretrain: JobConfig) -> Path:
    """The SimCLR encoder folder: ``encoder:`` if given, else the pretraining run's (run if unfinished)."""
    from jobs.train import run_job
    from polyclip.backbones import checkpoint_dir

    if comparison.encoder:
        return checkpoint_dir(comparison.encoder)
    run_dir = pretrain.run_dir
    stored = run_dir / "config.yaml"
    done = ((run_dir / "metrics.json").exists() and stored.exists()
            and yaml.safe_load(stored.read_text()) == pretrain.dump())
    if not done:
        logger.info("pretraining SimCLR: %s", pretrain.name)
        run_job(pretrain)
    return checkpoint_dir(str(run_dir / "checkpoint"))


def random_encoder(simclr: Path, seed: int, folder: Path) -> Path:
    """The SimCLR encoder's architecture and preprocessing at a seeded random init, saved."""
    meta = json.loads((simclr / "backbone.json").read_text())
    torch.manual_seed(seed)
    backbone = create_backbone(meta["arch_spec"], image_size=meta["preprocessing"]["image_size"],
                               in_chans=meta["preprocessing"]["in_chans"])
    return save_backbone(backbone, folder / "random-init-staging")


def run_comparison(comparison: ComparisonConfig, pretrain: JobConfig) -> list[dict[str, Any]]:
    """Pretrain (if needed), run the grid, write the table and the plot; return the rows."""
    from jobs.train import run_job

    folder = comparison.folder
    encoders = folder / "encoders"
    simclr = simclr_encoder(comparison, pretrain)
    specs = {SIMCLR: freeze_encoder(simclr, encoders, "simclr"),
             RANDOM: freeze_encoder(random_encoder(simclr, pretrain.seed, encoders), encoders, "random")}
    rows: list[dict[str, Any]] = []
    for entry in comparison.backbones:
        spec = specs.get(entry.spec, entry.spec)
        for k in comparison.labels_per_class:
            for mode in comparison.modes:
                cfg = job_overrides(comparison, entry, mode, k, spec)
                logger.info("comparison cell %s: %s", cfg.name, spec)
                metrics = run_job(cfg)
                rows.append({"backbone": entry.label, "mode": mode, "labels": "all" if k < 0 else f"{k}/class",
                             "n_labeled": sum(metrics["test"].get("train_label_counts", {}).values()),
                             "test_top1": metrics["test"]["top1"], "macro_f1": metrics["test"]["macro_f1"],
                             "epochs": metrics["epochs"], "train_s": metrics["seconds"]["train"],
                             "run": cfg.name})
                write_outputs(comparison, rows, specs)
    return rows


def write_outputs(comparison: ComparisonConfig, rows: list[dict[str, Any]], specs: dict[str, str]) -> None:
    """``comparison.md``, ``comparison.png`` and ``comparison.json`` (rewritten after every cell)."""
    folder = comparison.folder
    command = "python -m jobs.simclr_comparison " + " ".join(sys.argv[1:])
    note = (f"# {comparison.name}\n\nCommand: `{command}`\n\nEncoders: SimCLR `{specs[SIMCLR]}`, "
            f"random init `{specs[RANDOM]}`.\n\n{markdown_table(rows)}")
    atomic_write_text(folder / "comparison.md", note)
    atomic_write_json(folder / "comparison.json", {"command": command, "specs": specs, "rows": rows})
    grouped: dict[str, dict[str, float]] = {}
    for r in rows:
        labels = "all labels" if r["labels"] == "all" else r["labels"]
        grouped.setdefault(r["backbone"], {})[f"{r['mode']}, {labels}"] = r["test_top1"]
    grouped_bar_chart(grouped, folder / "comparison.png", title=f"{comparison.name}: test top-1", ylabel="accuracy")


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    """Entry point; returns the table rows (callable from tests)."""
    parser = job_parser("python -m jobs.simclr_comparison", __doc__, config_help="comparison YAML",
                        overrides_help="dotted.key=value overrides for every job")
    _, (comparison, pretrain) = start_job(parser, argv, lambda args: load_comparison(args.config, args.overrides),
                                          connect=init_ray)
    rows = run_comparison(comparison, pretrain)
    print(markdown_table(rows))
    print(f"comparison: {comparison.folder.resolve()}")
    return rows


if __name__ == "__main__":
    main(sys.argv[1:])
