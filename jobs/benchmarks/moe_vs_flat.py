"""Mixture of experts over superclasses vs the flat linear classifier, Fashion-MNIST.

Frozen EfficientNet-Lite0 features (112 px, cached; the same train pool and full 10k
test set as ``devise_zeroshot``), ``--labels`` labels per class drawn per seed. Models,
each trained full batch by the generic loop with the same optimiser and budget:

* ``flat``: polyclip's linear probe;
* ``moe:config``: superclasses given by hand (tops, footwear, trousers, bags);
* ``moe:vectors``: k-means of the labels' GloVe vectors, ``k`` groups;
* ``moe:confusion``: the flat probe's confusion matrix on held-out train-pool images
  (100 per class from the pool, not trained on), clustered into ``k`` groups (the recipe's route).

Each MoE answers with both routings from the same fit: ``:hard`` (the expert of the
predicted superclass) and ``:soft`` (argmax of ``p(s|x) p(c|s,x)``, a reparametrised flat
softmax, so it should tie ``flat``).

Reports test accuracy (median over seeds), superclass accuracy, the per-class confusion
heatmaps (first seed) and the most-confused class pairs of the flat model and each MoE.

Usage::

    python -m jobs.benchmarks.moe_vs_flat [--seeds 0 1 2] [--labels 100] [--k 4] [--epochs 300]
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import numpy as np
import torch
from sklearn.metrics import confusion_matrix

from jobs.benchmarks.common import announce, lite0_pool, out_dir, summary, write_results
from jobs.runtime import setup_logging
from polyclip.data.datasets import load_dataset
from polyclip.engine.fit import fit_arrays
from polyclip.features.cache import FeatureCache
from polyclip.methods.moe import (
    ROUTINGS,
    MixtureOfExpertsTask,
    assignment_from_names,
    fit_flat_probe,
    most_confused_pairs,
    superclasses_from_confusion,
    superclasses_from_vectors,
)
from polyclip.reports.plots import bar_chart, confusion_heatmap
from polyclip.reports.tables import markdown_table
from polyclip.text import DEFAULT_WORD_VECTORS, label_vectors, load_word_vectors

GIVEN = [["T-shirt/top", "pullover", "dress", "coat", "shirt"], ["sandal", "sneaker", "ankle boot"], ["trouser"],
         ["bag"]]


def fit_moe(x: np.ndarray, y: np.ndarray, assignment: list[int], num_classes: int, *, epochs: int, lr: float,
            seed: int) -> MixtureOfExpertsTask:
    torch.manual_seed(seed)
    task = MixtureOfExpertsTask(x.shape[1], assignment, num_classes)
    fit_arrays(task, {"x": x, "y": y}, epochs=epochs, optimizer="adam", lr=lr, weight_decay=1e-4,
               scheduler="constant", seed=seed)
    return task.eval()


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--labels", type=int, default=100, help="labels per class (at most 400)")
    parser.add_argument("--k", type=int, default=4)
    parser.add_argument("--epochs", type=int, default=300)
    parser.add_argument("--lr", type=float, default=0.05)
    parser.add_argument("--image-size", type=int, default=112)
    parser.add_argument("--cache-dir", default=".cache/features")
    return parser.parse_args(argv)


def seed_models(seed: int, x_lab: np.ndarray, y_lab: np.ndarray, x_test: np.ndarray, names: list[str],
                vectors: np.ndarray, args: argparse.Namespace) -> dict[str, tuple[np.ndarray, list[int] | None]]:
    """Test logits (and superclass assignment) of the flat probe and each MoE routing, trained for ``seed``."""
    num = len(names)
    rng = np.random.default_rng(seed)
    order = [rng.permutation(np.flatnonzero(y_lab == c)) for c in range(num)]
    rows = np.concatenate([o[:args.labels] for o in order])
    held = np.concatenate([o[args.labels:args.labels + 100] for o in order])  # for the confusion route
    x, y = x_lab[rows], y_lab[rows]
    x_val, y_val = x_lab[held], y_lab[held]
    flat = fit_flat_probe(x, y, num, epochs=args.epochs, lr=args.lr, seed=seed)
    with torch.no_grad():
        val_pred = flat.predict(torch.from_numpy(x_val)).argmax(1).numpy()
        flat_logits = flat.predict(torch.from_numpy(x_test)).numpy()
    groupings = {
        "moe:config": assignment_from_names(GIVEN, names),
        "moe:vectors": superclasses_from_vectors(vectors, args.k, seed=seed),
        "moe:confusion": superclasses_from_confusion(confusion_matrix(y_val, val_pred, labels=np.arange(num)),
                                                     args.k, seed=seed),
    }
    models: dict[str, tuple[np.ndarray, list[int] | None]] = {"flat": (flat_logits, None)}
    for label, assignment in groupings.items():
        task = fit_moe(x, y, assignment, num, epochs=args.epochs, lr=args.lr, seed=seed)
        # One fit, both routings: they share the loss and differ only in how they answer.
        for routing in ROUTINGS:
            task.routing = routing
            with torch.no_grad():
                models[f"{label}:{routing}"] = (task.predict(torch.from_numpy(x_test)).numpy(), assignment)
    return models


def score(seed: int, logits: np.ndarray, grouping: list[int] | None, y_test: np.ndarray, names: list[str]
          ) -> dict[str, Any]:
    """Top-1, confusion matrix and (for an MoE) superclass top-1 and the superclasses' names."""
    num = len(names)
    pred = logits.argmax(1)
    cm = confusion_matrix(y_test, pred, labels=np.arange(num))
    entry: dict[str, Any] = {"seed": seed, "top1": float((pred == y_test).mean()), "confusion": cm.tolist()}
    if grouping is not None:
        of = np.asarray(grouping)
        entry["superclass_top1"] = float((of[pred] == of[y_test]).mean())
        entry["superclasses"] = [[names[c] for c in range(num) if grouping[c] == g] for g in range(max(grouping) + 1)]
    return entry


def write_report(out: Path, command: str, args: argparse.Namespace, results: dict[str, list[dict[str, Any]]],
                 names: list[str], n_test: int) -> tuple[dict[str, Any], str]:
    """``results.{json,md}``, the accuracy chart and the first seed's confusion heatmaps."""
    table, pairs_md = [], []
    flat_med = summary([e["top1"] for e in results["flat"]])["median"]
    for label, entries in results.items():
        s = summary([e["top1"] for e in entries])
        row = {"model": label, "test_top1_median": s["median"], "per_seed": [round(v, 4) for v in s["values"]],
               "vs_flat": s["median"] - flat_med}
        if "superclasses" in entries[0]:
            row["superclass_top1_median"] = summary([e["superclass_top1"] for e in entries])["median"]
            row["superclasses (first seed)"] = " | ".join(", ".join(g) for g in entries[0]["superclasses"])
        table.append(row)
        slug = label.replace(":", "_")
        first = np.asarray(entries[0]["confusion"])
        confusion_heatmap(first, names, out / f"confusion_{slug}.png",
                          title=f"{label}: test confusion, seed {args.seeds[0]} (row-normalised)")
        pairs = most_confused_pairs(first, names, n=8, symmetric=True)
        pairs_md.append(f"### {label}\n\n" + markdown_table([{"class a": a, "class b": b, "confusions": n}
                                                               for a, b, n in pairs])
                        + f"\n![{label}](confusion_{slug}.png)\n")
    bar_chart({r["model"]: r["test_top1_median"] for r in table}, out / "accuracy.png",
              f"Fashion-MNIST, {args.labels} labels/class, Lite0 112 px: median test accuracy", "accuracy")
    extra = {"labels_per_class": args.labels, "k": args.k, "epochs": args.epochs, "seeds": args.seeds,
             "test_images": n_test, "table": table, "results": results}
    md = write_results(out, command, table, title="Mixture of experts vs flat classifier", extra=extra, blocks=[
        f"Frozen efficientnet_lite:0 features ({args.image_size} px), {args.labels} labels per class, full "
        f"{n_test}-image test set, seeds {args.seeds}; every model full-batch Adam, {args.epochs} steps, lr "
        f"{args.lr}. k = {args.k} derived superclasses.\n", table, "![accuracy](accuracy.png)\n",
        f"## Most-confused class pairs (seed {args.seeds[0]}, both directions summed)\n", "\n".join(pairs_md)])
    return {"command": command, "rows": table, **extra}, md


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    command = announce(argv, "jobs.benchmarks.moe_vs_flat")
    setup_logging()
    torch.set_num_threads(1)  # the CPU is shared; one thread per fit
    out = out_dir("moe_vs_flat")
    dataset = load_dataset("fashion_mnist")
    assert dataset.test is not None
    names = list(dataset.class_names)
    x_lab, y_lab, x_test, y_test = lite0_pool(dataset, FeatureCache(args.cache_dir), args.image_size)
    vectors = label_vectors(names, load_word_vectors(DEFAULT_WORD_VECTORS))
    results: dict[str, list[dict[str, Any]]] = {}
    for seed in args.seeds:
        models = seed_models(seed, x_lab, y_lab, x_test, names, vectors, args)
        for label, (logits, grouping) in models.items():
            results.setdefault(label, []).append(score(seed, logits, grouping, y_test, names))
        print(f"seed {seed}: " + ", ".join(f"{k} {v[-1]['top1']:.4f}" for k, v in results.items()), flush=True)
    report, md = write_report(out, command, args, results, names, len(y_test))
    print(md)
    return report


if __name__ == "__main__":
    main()
