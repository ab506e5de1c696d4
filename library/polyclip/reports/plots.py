"""Plots written into run directories (PNG, headless)."""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np

from polyclip.io import atomic_write_with


def _save(fig: plt.Figure, path: str | os.PathLike[str]) -> Path:
    out = atomic_write_with(path, lambda tmp: fig.savefig(tmp, format="png", dpi=120, bbox_inches="tight"))
    plt.close(fig)
    return out


def confusion_heatmap(cm: np.ndarray | Sequence[Sequence[int]], class_names: list[str],
                      path: str | os.PathLike[str], title: str = "Confusion matrix (row-normalised)") -> Path:
    """Row-normalised confusion matrix with counts in each cell."""
    cm = np.asarray(cm, dtype=float)
    norm = cm / np.maximum(cm.sum(axis=1, keepdims=True), 1)
    n = len(class_names)
    fig, ax = plt.subplots(figsize=(1.0 + 0.6 * n, 0.8 + 0.55 * n))
    im = ax.imshow(norm, cmap="Blues", vmin=0, vmax=1)
    ax.set_xticks(range(n), class_names, rotation=45, ha="right")
    ax.set_yticks(range(n), class_names)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(title)
    if n <= 30:
        for i in range(n):
            for j in range(n):
                ax.text(j, i, f"{int(cm[i, j])}", ha="center", va="center", fontsize=7,
                        color="white" if norm[i, j] > 0.5 else "black")
    fig.colorbar(im, ax=ax, fraction=0.046)
    return _save(fig, path)


def learning_curves(history: Sequence[Mapping[str, float]], path: str | os.PathLike[str]) -> Path:
    """Losses and accuracies per epoch, one panel each."""
    epochs = [h.get("epoch", i + 1) for i, h in enumerate(history)]
    loss_keys = sorted({k for h in history for k in h if "loss" in k})
    acc_keys = sorted({k for h in history for k in h if k.endswith(("acc", "top1", "mask_rate"))})
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for key in loss_keys:
        axes[0].plot(epochs, [h.get(key, np.nan) for h in history], marker="o", label=key)
    for key in acc_keys:
        axes[1].plot(epochs, [h.get(key, np.nan) for h in history], marker="o", label=key)
    axes[0].set_title("loss")
    axes[1].set_title("accuracy")
    for ax in axes:
        ax.set_xlabel("epoch")
        ax.grid(alpha=0.3)
        if ax.lines:
            ax.legend(fontsize=8)
    return _save(fig, path)


def bar_chart(values: Mapping[str, float], path: str | os.PathLike[str], title: str, ylabel: str,
              errors: Mapping[str, float] | None = None) -> Path:
    """One bar per entry, with optional error bars and the value printed on each."""
    names = list(values)
    fig, ax = plt.subplots(figsize=(max(5, 0.9 * len(names) + 2), 4))
    yerr = [errors.get(n, 0.0) for n in names] if errors else None
    bars = ax.bar(range(len(names)), [values[n] for n in names], yerr=yerr, capsize=3, color="#4c72b0")
    for bar, name in zip(bars, names):
        ax.text(bar.get_x() + bar.get_width() / 2, bar.get_height(), f"{values[name]:.3f}",
                ha="center", va="bottom", fontsize=8)
    ax.set_xticks(range(len(names)), names, rotation=30, ha="right")
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(axis="y", alpha=0.3)
    return _save(fig, path)


def grouped_bar_chart(values: Mapping[str, Mapping[str, float]], path: str | os.PathLike[str], title: str,
                      ylabel: str) -> Path:
    """Bars grouped on the x axis: ``values[group][series]``, one colour per series, value on each bar.

    Example:
        >>> values = {"SimCLR": {"probe": 0.85, "fine-tune": 0.9}, "random": {"probe": 0.74}}
        >>> grouped_bar_chart(values, "out.png", "test top-1", "accuracy")  # doctest: +SKIP
    """
    groups = list(values)
    series = list(dict.fromkeys(name for group in values.values() for name in group))
    width = 0.8 / max(1, len(series))
    fig, ax = plt.subplots(figsize=(max(6, 1.6 * len(groups) + 2), 4.5))
    colours = plt.get_cmap("tab10")
    for i, name in enumerate(series):
        xs = [g + (i - (len(series) - 1) / 2) * width for g, group in enumerate(groups) if name in values[group]]
        ys = [values[group][name] for group in groups if name in values[group]]
        bars = ax.bar(xs, ys, width, label=name, color=colours(i % 10))
        for bar, y in zip(bars, ys):
            ax.text(bar.get_x() + bar.get_width() / 2, bar.get_height(), f"{y:.3f}", ha="center", va="bottom",
                    fontsize=7)
    ax.set_xticks(range(len(groups)), groups)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))  # outside: never over a bar
    return _save(fig, path)


def line_plot(series: Mapping[str, tuple[Sequence[float], Sequence[float]]], path: str | os.PathLike[str],
              title: str, xlabel: str, ylabel: str) -> Path:
    """Several named ``(x, y)`` series on one axis."""
    fig, ax = plt.subplots(figsize=(6, 4))
    for name, (x, y) in series.items():
        ax.plot(x, y, marker="o", label=name)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return _save(fig, path)
