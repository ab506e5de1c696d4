"""The run directory's report: metrics.json, confusion heatmap, learning curves, report.md."""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from polyclip.io import atomic_write_json, atomic_write_text
from polyclip.metrics.classification import classification_metrics
from polyclip.reports.plots import confusion_heatmap, learning_curves, line_plot
from polyclip.reports.tables import markdown_table


def write_run_report(
    run_dir: str | os.PathLike[str],
    *,
    name: str,
    class_names: list[str],
    test_logits: np.ndarray,
    test_labels: np.ndarray,
    train_labels: np.ndarray,
    history: Sequence[Mapping[str, float]],
    val_logits: np.ndarray | None = None,
    val_labels: np.ndarray | None = None,
    extra: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """Compute and write every report file of a finished run.

    Args:
        run_dir: The run's folder.
        name: Run name, for titles.
        class_names: ``C`` names.
        test_logits: ``(N, C)`` final test scores.
        test_labels: ``(N,)``.
        train_labels: Labels trained on (for label counts).
        history: Per-epoch metrics.
        val_logits: Final validation scores, if any.
        val_labels: Their labels.
        extra: More entries for ``metrics.json`` (feature-cache stats, skipped files,
            semantic metrics...).

    Returns:
        The dict written to ``metrics.json``.
    """
    folder = Path(run_dir)
    metrics: dict[str, Any] = {"name": name, "test": classification_metrics(test_logits, test_labels, class_names,
                                                                              train_labels)}
    if val_logits is not None and val_labels is not None and len(val_labels):
        metrics["val"] = {"top1": float((val_logits.argmax(1) == val_labels).mean()), "n": len(val_labels)}
    metrics["epochs"] = len(history)
    metrics["history"] = list(history)
    if extra:
        metrics.update(extra)
    atomic_write_json(folder / "metrics.json", metrics)
    test = metrics["test"]
    atomic_write_text(folder / "classification_report.txt", test["classification_report_text"])
    confusion_heatmap(np.asarray(test["confusion_matrix"]), class_names, folder / "confusion.png",
                      title=f"{name}: test confusion (row-normalised)")
    if history:
        learning_curves(history, folder / "curves.png")
        thresholds = {k.removeprefix("threshold/"): k for k in history[-1] if k.startswith("threshold/")}
        if thresholds:  # class-aware adaptive thresholds, one line per class
            epochs = [h.get("epoch", i + 1) for i, h in enumerate(history)]
            line_plot({name: (epochs, [h.get(key, np.nan) for h in history]) for name, key in thresholds.items()},
                      folder / "thresholds.png", f"{name}: per-class confidence thresholds", "epoch", "threshold")
    atomic_write_text(folder / "report.md", summary_markdown(metrics))
    return metrics


def summary_row(metrics: Mapping[str, Any]) -> dict[str, Any]:
    """One table row: the numbers people compare runs by."""
    test = metrics["test"]
    last = metrics["history"][-1] if metrics.get("history") else {}
    row = {
        "run": metrics["name"],
        "test_top1": test["top1"],
        "test_top5": test["top5"],
        "macro_f1": test["macro_f1"],
        "val_top1": metrics.get("val", {}).get("top1"),
        "train_loss": last.get("train_loss"),
        "val_loss": last.get("val_loss"),
        "epochs": metrics.get("epochs"),
        "n_test": test["n"],
    }
    if "semantic" in metrics:
        row["semantic_error_distance"] = metrics["semantic"].get("semantic_error_distance")
    return row


def summary_markdown(metrics: Mapping[str, Any]) -> str:
    """``report.md``: the summary table and the per-class accuracies."""
    per_class = [{"class": k, "accuracy": v} for k, v in metrics["test"]["per_class_accuracy"].items()]
    return (
        f"# {metrics['name']}\n\n" + markdown_table([summary_row(metrics)])
        + "\n## Per-class test accuracy\n\n" + markdown_table(per_class)
        + "\n![confusion](confusion.png)\n\n![curves](curves.png)\n"
    )
