"""The adaptive ensemble against its baselines on the same test features.

Baselines (all from the same frozen heads):

* ``single:<name>``: each backbone's head alone.
* ``logit_average``: mean of the heads' logits (the untrained combiner).
* ``probability_average``: mean of the heads' softmax probabilities.
* ``oracle``: correct when *any* backbone's head is correct for that image. An upper
  bound on picking one backbone per image, so ``oracle >= every single`` always holds;
  a combination can still beat it on an image where no single head is right.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import torch

from polyclip.ensemble.model import Ensemble
from polyclip.io import atomic_write_text
from polyclip.reports.plots import bar_chart, line_plot
from polyclip.reports.tables import markdown_table

ADAPTIVE = "adaptive"
LOGIT_AVERAGE = "logit_average"
PROBABILITY_AVERAGE = "probability_average"
ORACLE = "oracle"


def single_key(name: str) -> str:
    """The accuracy key of one backbone's head."""
    return f"single:{name}"


@torch.no_grad()
def evaluate_ensemble(ensemble: Ensemble, features: Sequence[np.ndarray | torch.Tensor],
                      labels: np.ndarray | torch.Tensor) -> dict[str, object]:
    """Accuracy of the adaptive ensemble, each single backbone, the averages and the oracle.

    Args:
        ensemble: A fitted :class:`Ensemble`.
        features: Test features of every backbone, in the ensemble's order, each ``(N, D_b)``.
        labels: ``(N,)`` test labels.

    Returns:
        ``{"n", "chance", "accuracy": {key: float}, "best_single", "gain_over_best_single",
        "mean_weights": {name: float}, "protocol"}``; accuracy keys are ``adaptive``,
        ``logit_average``, ``probability_average``, ``oracle`` and ``single:<name>``.
    """
    if len(features) != ensemble.num_backbones:
        raise ValueError(f"need test features of all {ensemble.num_backbones} backbones, got {len(features)}")
    y = np.asarray(labels)
    tensors = [torch.as_tensor(np.asarray(f), dtype=torch.float32) for f in features]
    head_logits = [z.numpy() for z in ensemble.head_logits(tensors)]
    logits, weights = ensemble.predict(tensors)
    correct_single = {name: z.argmax(axis=1) == y for name, z in zip(ensemble.backbone_names, head_logits)}
    probabilities = [torch.softmax(torch.from_numpy(z), dim=1).numpy() for z in head_logits]
    accuracy: dict[str, float] = {
        ADAPTIVE: float((logits.argmax(axis=1) == y).mean()),
        LOGIT_AVERAGE: float((np.mean(head_logits, axis=0).argmax(axis=1) == y).mean()),
        PROBABILITY_AVERAGE: float((np.mean(probabilities, axis=0).argmax(axis=1) == y).mean()),
        ORACLE: float(np.any(list(correct_single.values()), axis=0).mean()),
    }
    for name, correct in correct_single.items():
        accuracy[single_key(name)] = float(correct.mean())
    best = max(correct_single, key=lambda name: accuracy[single_key(name)])
    return {
        "n": len(y),
        "chance": 1.0 / ensemble.num_classes,
        "accuracy": accuracy,
        "best_single": best,
        "gain_over_best_single": accuracy[ADAPTIVE] - accuracy[single_key(best)],
        "mean_weights": {name: float(w) for name, w in zip(ensemble.backbone_names, weights.mean(axis=0))},
        "protocol": ensemble.metadata.get("protocol"),
    }


def write_ensemble_report(results: Mapping[str, object], out_dir: str | os.PathLike[str],
                          title: str = "Adaptive backbone ensemble") -> dict[str, Path]:
    """Write ``ensemble.md`` (tables) and ``ensemble_accuracy.png`` (+ ``cascade.png``).

    Args:
        results: The dict of :func:`fit_ensemble` (``evaluation``, optional ``cascade``) or of
            :func:`evaluate_ensemble` directly.
        out_dir: Run directory; files are written atomically.
        title: Plot and page title.

    Returns:
        ``{"markdown": path, "accuracy_plot": path[, "cascade_plot": path]}``.
    """
    out = Path(out_dir)
    evaluation = results.get("evaluation", results)
    if not isinstance(evaluation, Mapping) or "accuracy" not in evaluation:
        raise ValueError("results hold no evaluation (pass test features to fit_ensemble)")
    accuracy: Mapping[str, float] = evaluation["accuracy"]  # type: ignore[assignment]
    best = accuracy[single_key(str(evaluation["best_single"]))]
    rows = [{"method": key, "accuracy": value, "vs best single": value - best} for key, value in accuracy.items()]
    protocol = results.get("protocol", evaluation.get("protocol"))
    lines = [f"# {title}\n", f"Test images: {evaluation['n']}; chance {float(evaluation['chance']):.4f}; "  # type: ignore[arg-type]
             f"label protocol: {protocol}.\n", markdown_table(rows, ["method", "accuracy", "vs best single"])]
    weights = evaluation.get("mean_weights")
    if isinstance(weights, Mapping):
        lines += ["\nMean backbone weight (normalised 1/t) on the test set:\n",
                  markdown_table([{"backbone": k, "mean weight": v} for k, v in weights.items()])]
    paths = {"accuracy_plot": bar_chart(dict(accuracy), out / "ensemble_accuracy.png", title, "test accuracy")}
    cascade = results.get("cascade")
    if isinstance(cascade, Mapping) and cascade.get("curve"):
        curve: list[Mapping[str, float]] = cascade["curve"]  # type: ignore[assignment]
        lines += ["\nCascade (backbones in cost order, stop when max probability >= threshold):\n",
                  markdown_table(curve, ["threshold", "accuracy", "mean_calls"])]
        if cascade.get("chosen"):
            lines.append(f"\nChosen on validation: {cascade['chosen']}; on the test set at that threshold: "
                         f"{cascade.get('chosen_test')} (test data never chooses)\n")
        paths["cascade_plot"] = line_plot(
            {"cascade": ([p["mean_calls"] for p in curve], [p["accuracy"] for p in curve])},
            out / "cascade.png", "Cascade: accuracy vs backbone calls", "mean backbone calls per image", "accuracy")
    paths["markdown"] = atomic_write_text(out / "ensemble.md", "\n".join(lines))
    return paths
