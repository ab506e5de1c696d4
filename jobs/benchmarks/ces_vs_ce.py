"""CES vs cross-entropy on Fashion-MNIST: test accuracy and semantic error distance at equal epochs.

Usage::

    python -m jobs.benchmarks.ces_vs_ce [--seeds 0 1 2] [--epochs 10] [--labels-per-class 100] [--test-limit 5000]

Both losses train the same job (``jobs/configs/language/ce.yaml`` and ``ces.yaml``: a
small CNN from scratch with the CES paper's perturbations, CES with the paper's 0.8 / 0.2
weights and GloVe 6B-50d label similarities) with the same seed, split, batches and
epochs, side by side (CE then CES for each seed). To keep the budget affordable on a
shared 2-core machine the runs are in one process, through the same recipe
(``prepare`` / ``build_task``) and the same generic loop as the Ray job, without Ray.

Figures: ``runs/benchmarks/ces_vs_ce/`` (``ces_vs_ce.md``, ``.json``, ``.png``).
"""

from __future__ import annotations

import argparse
import time
from typing import Any

import numpy as np
import torch

from jobs.benchmarks.common import announce, median, out_dir, summary, write_results
from jobs.config import load_config
from jobs.data import load_data
from jobs.recipes import RECIPES, PrepareContext
from jobs.semantics import label_similarity_for, semantic_metrics
from polyclip.engine import evaluate
from polyclip.engine.fit import fit_arrays
from polyclip.reports.plots import bar_chart

CONFIGS = {"ce": "jobs/configs/language/ce.yaml", "ces": "jobs/configs/language/ces.yaml"}


def run_one(config: str, seed: int, epochs: int, overrides: list[str]) -> dict[str, Any]:
    """Train one config in-process (recipe + generic loop) and measure it on the test split."""
    cfg = load_config(config, [f"seed={seed}", f"train.epochs={epochs}", *overrides])
    torch.manual_seed(seed)
    dataset, split = load_data(cfg)
    ctx = PrepareContext(cfg=cfg, dataset=dataset, split=split, features=lambda *a: np.zeros(0))
    recipe = RECIPES[cfg.method.name]
    payload = recipe.prepare(ctx, cfg.method)
    similarity = label_similarity_for(cfg, dataset.class_names, payload)
    task = recipe.build_task(cfg, cfg.method, payload)
    # The Ray job's global batch is batch_size * num_workers; keep it the same here.
    tic = time.perf_counter()
    logs = fit_arrays(task, payload.train, epochs=epochs, batch_size=cfg.train.batch_size * cfg.scaling.num_workers,
                      optimizer=cfg.train.optimizer, lr=cfg.train.lr, weight_decay=cfg.train.weight_decay,
                      scheduler=cfg.train.scheduler, seed=seed).history[-1]
    train_s = time.perf_counter() - tic
    task.eval()
    predict: Any = task.predict
    logits = evaluate(predict, payload.test["x"], device=torch.device("cpu"))
    labels = payload.test["y"]
    semantic = semantic_metrics(logits, labels, similarity, source=cfg.word_vectors.source)  # type: ignore[union-attr]
    return {"loss": cfg.method.loss, "seed": seed, "test_acc": float((logits.argmax(1) == labels).mean()),
            "semantic_error_distance": semantic["semantic_error_distance"],
            "top3_similarity": semantic["top3_similarity"], "train_loss": logs["train_loss"],
            "train_seconds": train_s, "n_train": len(payload.train["y"]), "n_test": len(labels)}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--labels-per-class", type=int, default=100)
    parser.add_argument("--test-limit", type=int, default=5000)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--name", default="ces_vs_ce", help="output folder under runs/benchmarks/")
    return parser.parse_args(argv)


def compare(runs: list[dict[str, Any]]) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Medians per loss, and the paired (same seed) CES vs CE figures with the targets."""
    by = {loss: [r for r in runs if r["loss"] == loss] for loss in CONFIGS}
    rows: list[dict[str, Any]] = []
    for loss, rs in by.items():
        rows.append({"loss": loss, "test_acc_median": median([r["test_acc"] for r in rs]),
                     "semantic_error_distance_median": median([r["semantic_error_distance"] for r in rs]),
                     "top3_similarity_median": median([r["top3_similarity"] for r in rs]),
                     "train_seconds_median": median([r["train_seconds"] for r in rs]), "seeds": len(rs)})
    # Paired per seed: same split, same batches.
    acc_delta = [c["test_acc"] - e["test_acc"] for e, c in zip(by["ce"], by["ces"], strict=True)]
    dist_ratio = [c["semantic_error_distance"] / e["semantic_error_distance"]
                  for e, c in zip(by["ce"], by["ces"], strict=True)]
    figures = {
        "ces": {"test_acc": summary([r["test_acc"] for r in by["ces"]]),
                "semantic_error_distance": summary([r["semantic_error_distance"] for r in by["ces"]])},
        "ce": {"test_acc": summary([r["test_acc"] for r in by["ce"]]),
               "semantic_error_distance": summary([r["semantic_error_distance"] for r in by["ce"]])},
        "paired": {"test_acc_points_ces_minus_ce": summary([100 * d for d in acc_delta]),
                   "error_distance_ratio_ces_over_ce": summary(dist_ratio)},
        "targets_met": {"error distance lower by >= 10%": median(dist_ratio) <= 0.9,
                        "accuracy loss <= 0.5 points": median(acc_delta) * 100 >= -0.5},
    }
    return rows, figures


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    command = announce(argv, "jobs.benchmarks.ces_vs_ce")
    torch.set_num_threads(args.threads)
    overrides = [f"data.labels_per_class={args.labels_per_class}", f"data.test_limit={args.test_limit}"]
    runs = []
    for seed in args.seeds:
        for loss, config in CONFIGS.items():
            result = run_one(config, seed, args.epochs, overrides)
            runs.append(result)
            print(f"seed {seed} {loss}: test acc {result['test_acc']:.4f}, semantic error distance "
                  f"{result['semantic_error_distance']:.4f} ({result['train_seconds']:.0f} s)", flush=True)
    rows, figures = compare(runs)
    folder = out_dir(args.name)
    bars: dict[str, float] = {f"{r['loss']} (acc)": r["test_acc_median"] for r in rows}
    bars |= {f"{r['loss']} (err. dist.)": r["semantic_error_distance_median"] for r in rows}
    bar_chart(bars,
              folder / "ces_vs_ce.png", title=f"CES vs CE, median of {len(args.seeds)} seeds, {args.epochs} epochs",
              ylabel="test accuracy / semantic error distance")
    paired = figures["paired"]
    acc, dist = paired["test_acc_points_ces_minus_ce"], paired["error_distance_ratio_ces_over_ce"]
    extra = {"args": vars(args), "runs": runs, **figures}
    md = write_results(folder, command, rows, title="CES vs cross-entropy on Fashion-MNIST", extra=extra,
                       stem="ces_vs_ce", blocks=[
        f"{args.labels_per_class} labels per class, {args.epochs} epochs, seeds {args.seeds}, "
        f"test set of {runs[0]['n_test']} images; CPU shared with other jobs (times are indicative).\n", rows,
        "## Per run\n", runs, "## Paired (same seed)\n",
        f"- test accuracy, CES minus CE (points): median {acc['median']:+.2f} "
        f"(values {[round(d, 2) for d in acc['values']]})\n"
        f"- semantic error distance, CES / CE: median {dist['median']:.3f} "
        f"(values {[round(r, 3) for r in dist['values']]})\n"
        f"- targets (error distance -10% or more, accuracy loss <= 0.5 points): {figures['targets_met']}\n",
        "![ces vs ce](ces_vs_ce.png)\n"])
    print(md)
    return {"command": command, "rows": rows, **extra}


if __name__ == "__main__":
    main()
