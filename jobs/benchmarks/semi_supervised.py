"""Test accuracy of the semi-supervised configs on Fashion-MNIST (40 and 250 labels).

Usage::

    python -m jobs.benchmarks.semi_supervised [--labels 40 250] [--configs supervised fixmatch ...]
        [--seeds 0] [--epochs E] [--steps S] [--unlabeled N] [--out runs/benchmarks/semi_supervised]

    python -m jobs.benchmarks.semi_supervised --teachers [--labels 40] [--seeds 0 1 2] [--pool 6000]
        [--spec pixels]

``--teachers`` compares the pool teachers alone, in-process and without Ray: the probe
teacher (L2 and threshold chosen on the validation split) and the label-propagation
teacher (threshold chosen on the validation nodes of its graph), over several label
draws, reporting median / min / max pool accuracy and the precision of the accepted
labels at each chosen threshold (the pool's labels are read only to score the result).

Otherwise it runs ``jobs/configs/semi/fm<labels>_<config>.yaml`` through ``jobs.train.run_job`` on one
local Ray instance, with optional budget overrides (epochs, steps per epoch, unlabeled
pool cap) so a contended CPU can afford it; the budget of every number is written next to
it. Writes ``results.json`` and ``results.md`` (updated after every run), ``accuracy.png``
and, for adaptive-threshold runs, ``thresholds_<run>.png`` under ``--out``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from jobs.benchmarks.common import announce, out_dir, write_results

CONFIG_DIR = Path(__file__).resolve().parents[1] / "configs" / "semi"
CONFIGS = ("supervised", "teacher", "fixmatch", "combined", "fixmatch_adaptive")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--labels", type=int, nargs="+", default=[40, 250], choices=[40, 250])
    parser.add_argument("--configs", nargs="+", default=list(CONFIGS), choices=CONFIGS)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--epochs", type=int, default=None, help="override train.epochs")
    parser.add_argument("--steps", type=int, default=None, help="override train.steps_per_epoch")
    parser.add_argument("--unlabeled", type=int, default=None, help="override data.unlabeled (pool cap)")
    parser.add_argument("--out", default="runs/benchmarks/semi_supervised", help="output folder")
    parser.add_argument("--address", default=None)
    parser.add_argument("--teachers", action="store_true", help="compare the pool teachers only (no training)")
    parser.add_argument("--pool", type=int, default=6000, help="--teachers: pool images per draw")
    parser.add_argument("--val-per-class", type=int, default=50, help="--teachers: validation images per class")
    parser.add_argument("--spec", default="pixels",
                        help="--teachers: features; 'pixels' (centred), else a create_backbone spec")
    parser.add_argument("--k", type=int, default=10, help="--teachers: neighbours of the propagation graph")
    return parser.parse_args(argv)


def teacher_features(spec: str, images: np.ndarray, batch: int = 500) -> np.ndarray:
    """Features of uint8 ``(N, C, H, W)`` images: centred pixels, or a backbone's pooled features."""
    if spec == "pixels":
        x = images.reshape(len(images), -1).astype(np.float32) / 255.0
        return x - x.mean(0)
    import torch

    from polyclip.backbones import create_backbone

    backbone = create_backbone(spec).eval()
    out = []
    with torch.no_grad():
        for start in range(0, len(images), batch):
            x = backbone.normalize(backbone.to_unit(torch.from_numpy(images[start : start + batch])))
            out.append(backbone.forward_features(x).float().numpy())
    return np.concatenate(out)


def compare_teachers(args: argparse.Namespace) -> list[dict[str, Any]]:
    """Probe vs label-propagation teacher over label draws (see the module docstring)."""
    from polyclip.data.datasets import load_dataset
    from polyclip.methods.label_propagation import propagate_with_validation
    from polyclip.methods.teacher import choose_confidence_threshold, fit_probe_teacher, select_probe_teacher

    data = load_dataset("fashion_mnist")
    y_all = np.asarray(data.train.labels)
    classes = int(y_all.max()) + 1
    rows = []
    for labels in args.labels:
        for seed in args.seeds:
            rng = np.random.default_rng(seed)
            per_class = labels // classes
            picked = [rng.permutation(np.flatnonzero(y_all == c))[: per_class + args.val_per_class]
                      for c in range(classes)]
            labeled = np.concatenate([p[:per_class] for p in picked])
            val = np.concatenate([p[per_class:] for p in picked])
            rest = np.setdiff1d(np.arange(len(y_all)), np.concatenate([labeled, val]))
            pool = rng.choice(rest, size=min(args.pool, len(rest)), replace=False)
            tic = time.perf_counter()
            feats = teacher_features(args.spec, data.train.images[np.concatenate([labeled, val, pool])])
            xl, xv, xp = np.split(feats, [len(labeled), len(labeled) + len(val)])
            yl, yv, yp = y_all[labeled], y_all[val], y_all[pool]
            t_feat = time.perf_counter() - tic
            for teacher in ("probe", "propagation"):
                tic = time.perf_counter()
                if teacher == "probe":
                    sel = select_probe_teacher(xl, yl, classes, val_features=xv, val_labels=yv)
                    probs = fit_probe_teacher(xl, yl, xp, classes, l2_reg=float(sel.l2_reg or 0.0))
                    tau, extra = sel.threshold, {"l2_reg": sel.l2_reg}
                else:
                    probs, val_probs = propagate_with_validation(xl, yl, xp, xv, classes, k=args.k)
                    tau = choose_confidence_threshold(val_probs, yv)[0]
                    extra = {"k": args.k, "val_acc": float((val_probs.argmax(1) == yv).mean())}
                keep = probs.max(1) >= tau
                rows.append({"labels": labels, "seed": seed, "teacher": teacher, "spec": args.spec,
                             "pool": len(pool), "pool_acc": float((probs.argmax(1) == yp).mean()),
                             "threshold": tau, "accepted": int(keep.sum()),
                             "precision": float((probs.argmax(1)[keep] == yp[keep]).mean()) if keep.any() else None,
                             "seconds": round(time.perf_counter() - tic + t_feat, 1), **extra})
                print(rows[-1], flush=True)
    return rows


def summarise_teachers(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Median (min-max) pool accuracy per labels x teacher."""
    out = []
    for key in sorted({(r["labels"], r["teacher"]) for r in rows}):
        accs = [r["pool_acc"] for r in rows if (r["labels"], r["teacher"]) == key]
        prec = [r["precision"] for r in rows if (r["labels"], r["teacher"]) == key and r["precision"] is not None]
        out.append({"labels": key[0], "teacher": key[1], "draws": len(accs),
                    "median pool acc": statistics.median(accs), "min": min(accs), "max": max(accs),
                    "median precision at chosen threshold": statistics.median(prec) if prec else None})
    return out


def teacher_report(metrics: dict[str, Any]) -> dict[str, Any] | None:
    """The teacher's pseudo-label report, which the semi recipe puts into metrics.json."""
    return metrics.get("teacher_report")  # type: ignore[no-any-return]


def plot_thresholds(history: list[dict[str, float]], path: Path, title: str) -> None:
    from polyclip.reports.plots import line_plot

    keys = sorted({k for row in history for k in row if k.startswith("threshold/")})
    series = {k.split("/", 1)[1]: ([row["epoch"] for row in history if k in row],
                                   [row[k] for row in history if k in row]) for k in keys}
    line_plot(series, path, title, "epoch", "class threshold tau_c")


def run_teachers(args: argparse.Namespace, out: Path, command: str) -> dict[str, Any]:
    """``--teachers``: the pool teachers compared over label draws; ``teachers.{json,md}``."""
    tic = time.perf_counter()
    rows = compare_teachers(args)
    summary = summarise_teachers(rows)
    table = write_results(out, command, rows, title="Pool teachers on Fashion-MNIST", blocks=[summary],
                          extra={"summary": summary, "wall_seconds": round(time.perf_counter() - tic, 1)},
                          stem="teachers")
    print(table)
    return {"teachers": rows, "summary": summary}


def run_config(labels: int, name: str, seed: int, args: argparse.Namespace, out: Path) -> dict[str, Any]:
    """Train one shipped config through ``jobs.train.run_job``; its row (an ``error`` when it failed)."""
    from jobs.config import load_config
    from jobs.train import run_job

    overrides = [f"seed={seed}", f"run.output_dir={out / 'runs'}"]
    if args.epochs:
        overrides.append(f"train.epochs={args.epochs}")
        overrides.append(f"train.eval_every={args.epochs}")
    if args.steps:
        overrides.append(f"train.steps_per_epoch={args.steps}")
    if args.unlabeled:
        overrides.append(f"data.unlabeled={args.unlabeled}")
    base = load_config(CONFIG_DIR / f"fm{labels}_{name}.yaml", overrides)
    run_name = f"{base.name}-s{seed}-e{base.train.epochs}x{base.train.steps_per_epoch}-u{base.data.unlabeled}"
    cfg = load_config(CONFIG_DIR / f"fm{labels}_{name}.yaml", [*overrides, f"name={run_name}"])
    row: dict[str, Any] = {"labels": labels, "config": name, "seed": seed, "run": cfg.name,
                           "epochs": cfg.train.epochs, "steps_per_epoch": cfg.train.steps_per_epoch,
                           "steps": cfg.train.epochs * (cfg.train.steps_per_epoch or 0),
                           "batch": cfg.train.batch_size,
                           "mu": getattr(cfg.method, "mu", None), "unlabeled_pool": cfg.data.unlabeled,
                           "backbone": cfg.backbone.spec, "workers": cfg.scaling.num_workers}
    tic = time.perf_counter()
    try:
        metrics = run_job(cfg)
    except Exception as exc:  # one failed config must not lose the others' numbers
        row.update(error=f"{type(exc).__name__}: {exc}", seconds=round(time.perf_counter() - tic, 1))
        print(f"FAILED {cfg.name}: {row['error']}", flush=True)
        return row
    history = metrics.get("history", [])
    last = history[-1] if history else {}
    row.update(test_top1=metrics["test"]["top1"], seconds=round(time.perf_counter() - tic, 1),
               mask_rate=last.get("mask_rate"), pseudo_acc=last.get("pseudo_acc"),
               teacher_mask_rate=last.get("teacher_mask_rate"), teacher_pseudo_acc=last.get("teacher_pseudo_acc"))
    report = teacher_report(metrics)
    if report is not None:
        first = report["thresholds"][0]
        row.update(teacher_pool_acc=report["teacher_accuracy"], teacher_accepted=first["accepted"],
                   teacher_precision=first["precision"], never_passing=first["never_passing"],
                   teacher_per_class_precision={k: v["precision"] for k, v in first["per_class"].items()})
    if any(k.startswith("threshold/") for k in last):
        plot_thresholds(history, out / f"thresholds_{cfg.name}.png", f"class-aware thresholds, {cfg.name}")
    print(f"{cfg.name}: test top1 {row['test_top1']:.4f} in {row['seconds']} s", flush=True)
    return row


def previous_results(path: Path) -> list[dict[str, Any]]:
    """The rows of an earlier report in ``path`` (kept unless rerun); a plain list is an older report's."""
    if not path.exists():
        return []
    previous = json.loads(path.read_text())
    return previous if isinstance(previous, list) else previous["rows"]  # type: ignore[no-any-return]


def write_report(results: list[dict[str, Any]], out: Path, command: str) -> str:
    """``results.{json,md}`` and ``accuracy.png``; returns the markdown."""
    from polyclip.reports.plots import bar_chart

    groups: dict[str, list[float]] = {}
    for r in results:
        if "test_top1" in r:
            groups.setdefault(f"{r['labels']}/{r['config']}", []).append(r["test_top1"])
    if groups:
        bar_chart({k: statistics.median(v) for k, v in sorted(groups.items())}, out / "accuracy.png",
                  "Fashion-MNIST test top-1 (median over seeds)", "test top-1")
    columns = ["labels", "config", "seed", "test_top1", "steps", "epochs", "steps_per_epoch", "batch", "mu",
               "unlabeled_pool", "mask_rate", "pseudo_acc", "teacher_accepted", "teacher_precision",
               "never_passing", "seconds", "error"]
    return write_results(out, command, results, title="Semi-supervised Fashion-MNIST",
                         blocks=[[{c: r.get(c, "") for c in columns} for r in results]])


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    command = announce(argv, "jobs.benchmarks.semi_supervised")
    out = out_dir(args.out)
    if args.teachers:
        return run_teachers(args, out, command)
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    from jobs.runtime import init_ray, setup_logging

    setup_logging()
    results = previous_results(out / "results.json")
    init_ray(args.address)
    for labels in args.labels:
        for name in args.configs:
            for seed in args.seeds:
                row = run_config(labels, name, seed, args, out)
                results = [r for r in results if r["run"] != row["run"]] + [row]
                write_report(results, out, command)  # after every run: a killed sweep keeps its numbers
    print(write_report(results, out, command))
    return {"results": results}


if __name__ == "__main__":
    main(sys.argv[1:])
