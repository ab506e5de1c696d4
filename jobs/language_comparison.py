"""The language-guided comparison: five jobs on one Ray instance, one table (Table I of the CES paper).

Usage::

    python -m jobs.language_comparison --config jobs/configs/language/comparison.yaml [k=v ...] [--address ADDR]

The comparison config names the job configs to run (``runs: {label: path}``, paths
relative to the comparison file) and dotted ``overrides`` applied to every run (the
command line adds more). Every job config is validated before Ray starts; the jobs run
one after another through :func:`jobs.train.run_job` on the same Ray instance, each in
``<output_dir>/<name>/<job name>/``. The table (train loss, validation loss, train
accuracy, validation and test accuracy, semantic error distance) is written as
``comparison.md``, ``comparison.png`` (a rendered table) and ``comparison.json`` in
``<output_dir>/<name>/``.
"""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path
from typing import Any

from pydantic import Field

from jobs.cli import job_parser, start_job
from jobs.config import JobConfig, load_config
from jobs.config_base import ConfigError, SafeName, StrictModel, read_yaml_mapping, validate
from jobs.runtime import init_ray
from polyclip.io import atomic_write_json, atomic_write_text
from polyclip.reports.tables import markdown_table

logger = logging.getLogger("polyclip")

#: Table columns: (key in a row, header).
COLUMNS = [
    ("strategy", "Strategy"),
    ("train_loss", "Train loss"),
    ("val_loss", "Validation loss"),
    ("train_acc", "Train acc."),
    ("val_acc", "Validation acc."),
    ("test_acc", "Test acc."),
    ("semantic_error_distance", "Semantic error distance"),
]


class ComparisonConfig(StrictModel):
    """A comparison: which job configs, with which shared overrides."""

    name: SafeName
    output_dir: str = "runs"
    runs: dict[str, str] = Field(..., min_length=1, description="table label -> job config path")
    overrides: list[str] = Field(default_factory=list)


def load_comparison(path: str | os.PathLike[str], overrides: list[str] | None = None
                    ) -> tuple[ComparisonConfig, dict[str, JobConfig]]:
    """Read a comparison config and validate every job in it (before any Ray work).

    Args:
        path: The comparison YAML.
        overrides: More dotted overrides for every job (after the file's own).

    Returns:
        The comparison and ``{label: job config}`` in table order; each job writes to
        ``<output_dir>/<comparison name>/<job name>``.

    Raises:
        ConfigError: Bad comparison keys, a missing job config, an invalid job, or two
            jobs with the same name.
    """
    file = Path(path)
    data = read_yaml_mapping(file, "comparison config")
    comparison = validate(ComparisonConfig, data, f"{file}: invalid comparison config")
    folder = Path(comparison.output_dir) / comparison.name
    jobs: dict[str, JobConfig] = {}
    for label, job_path in comparison.runs.items():
        resolved = Path(job_path) if Path(job_path).is_absolute() else file.parent / job_path
        try:
            jobs[label] = load_config(resolved, [*comparison.overrides, *(overrides or []),
                                                 f"run.output_dir={folder}"])
        except ConfigError as exc:
            raise ConfigError(f"run {label!r} ({resolved}): {exc}") from None
    names = [cfg.name for cfg in jobs.values()]
    if len(set(names)) != len(names):
        raise ConfigError(f"job names must differ within a comparison, got {names}")
    return comparison, jobs


def table_row(label: str, metrics: dict[str, Any]) -> dict[str, Any]:
    """One row of the table from a run's ``metrics.json``: the last epoch's train/val numbers."""
    last = metrics["history"][-1] if metrics.get("history") else {}
    return {
        "strategy": label,
        "run": metrics["name"],
        "train_loss": last.get("train_loss"),
        "val_loss": last.get("val_loss"),
        "train_acc": last.get("train_acc"),
        "val_acc": metrics.get("val", {}).get("top1"),
        "test_acc": metrics["test"]["top1"],
        "semantic_error_distance": metrics.get("semantic", {}).get("semantic_error_distance"),
        "epochs": metrics.get("epochs"),
        "n_test": metrics["test"]["n"],
        "train_seconds": metrics.get("seconds", {}).get("train"),
    }


def _cell(key: str, value: Any) -> str:
    if value is None:
        return "n/a"
    if key.endswith("_acc"):
        return f"{100 * value:.2f}%"
    return f"{value:.4f}" if isinstance(value, float) else str(value)


def table_markdown(rows: list[dict[str, Any]], title: str) -> str:
    """The table as Markdown, accuracies in percent."""
    shown = [{header: _cell(key, row.get(key)) for key, header in COLUMNS} for row in rows]
    return f"# {title}\n\n" + markdown_table(shown, [header for _, header in COLUMNS])


def table_png(rows: list[dict[str, Any]], path: str | os.PathLike[str], title: str) -> Path:
    """The table rendered as an image (Table I style: a plain grid, a caption underneath)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cells = [[_cell(key, row.get(key)) for key, _ in COLUMNS] for row in rows]
    fig, ax = plt.subplots(figsize=(11, 0.5 + 0.42 * (len(rows) + 1)))
    ax.axis("off")
    table = ax.table(cellText=cells, colLabels=[header for _, header in COLUMNS], loc="center", cellLoc="center")
    table.auto_set_font_size(False)
    table.set_fontsize(10)
    table.auto_set_column_width(col=list(range(len(COLUMNS))))  # long headers and strategy names fit
    table.scale(1.0, 1.5)
    for (r, c), cell in table.get_celld().items():
        cell.set_edgecolor("#444444")
        if r == 0:
            cell.set_text_props(weight="bold")
        if c == 0 and r > 0:
            cell.set_text_props(ha="left")
    fig.text(0.5, 0.02, title.upper(), ha="center", va="bottom", fontsize=9)
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=150, bbox_inches="tight")
    plt.close(fig)
    return out


def write_table(rows: list[dict[str, Any]], folder: Path, title: str) -> dict[str, Path]:
    """``comparison.md``, ``comparison.png`` and ``comparison.json`` in ``folder``."""
    folder.mkdir(parents=True, exist_ok=True)
    note = ("\nLast-epoch train loss and accuracy are the training objective and accuracy on training "
            "batches (augmented, in training mode; the distilled student's loss is cosine + cross-entropy). "
            "Validation loss is cross-entropy. Semantic error distance: mean GloVe cosine distance between "
            "predicted and true labels over misclassified test images (lower: more sensible mistakes).\n")
    md = table_markdown(rows, title) + note + "\n![table](comparison.png)\n"
    paths = {"md": folder / "comparison.md", "png": folder / "comparison.png", "json": folder / "comparison.json"}
    atomic_write_text(paths["md"], md)
    table_png(rows, paths["png"], title)
    atomic_write_json(paths["json"], rows)
    return paths


def run_comparison(comparison: ComparisonConfig, jobs: dict[str, JobConfig]) -> list[dict[str, Any]]:
    """Run every job on the connected Ray cluster and write the table; return its rows."""
    from jobs.train import check_resumable, run_job

    rows = []
    for i, (label, cfg) in enumerate(jobs.items()):
        logger.info("comparison %s: run %d/%d %r (%s)", comparison.name, i + 1, len(jobs), label, cfg.name)
        check_resumable(cfg)
        rows.append(table_row(label, run_job(cfg)))
    write_table(rows, Path(comparison.output_dir) / comparison.name, "Training results across different strategies")
    return rows


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    """Entry point; returns the table rows (callable from tests)."""
    parser = job_parser("python -m jobs.language_comparison", __doc__, config_help="comparison YAML",
                        overrides_help="dotted.key=value overrides for every job")
    _, (comparison, jobs) = start_job(parser, argv, lambda args: load_comparison(args.config, args.overrides),
                                      connect=init_ray)
    rows = run_comparison(comparison, jobs)
    print(table_markdown(rows, comparison.name))
    print(f"table: {(Path(comparison.output_dir) / comparison.name / 'comparison.md').resolve()}")
    return rows


if __name__ == "__main__":
    main(sys.argv[1:])
