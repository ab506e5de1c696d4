"""Test accuracy of the semi-supervised configs on Fashion-MNIST (40 and 250 labels).

Usage::

    python -m jobs.benchmarks.semi_supervised [--labels 40 250] [--configs supervised fixmatch ...]
        [--seeds 0] [--epochs E] [--steps S] [--unlabeled N] [--out runs/benchmarks/semi_supervised]

Runs ``jobs/configs/semi/fm<labels>_<config>.yaml`` through ``jobs.train.run_job`` on one
local Ray instance, with optional budget overrides (epochs, steps per epoch, unlabeled
pool cap) so a contended CPU can afford it; the budget of every number is written next to
it. Writes ``results.json`` (updated after every run), ``results.md``, ``accuracy.png``
and, for adaptive-threshold runs, ``thresholds_<run>.png`` under ``--out``.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import statistics
import sys
import time
from pathlib import Path
from typing import Any

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
    parser.add_argument("--out", default="runs/benchmarks/semi_supervised")
    parser.add_argument("--address", default=None)
    return parser.parse_args(argv)


def teacher_report(metrics: dict[str, Any]) -> dict[str, Any] | None:
    """The teacher's pseudo-label report, which the semi recipe puts into metrics.json."""
    return metrics.get("teacher_report")  # type: ignore[no-any-return]


def plot_thresholds(history: list[dict[str, float]], path: Path, title: str) -> None:
    from polyclip.reports.plots import line_plot

    keys = sorted({k for row in history for k in row if k.startswith("threshold/")})
    series = {k.split("/", 1)[1]: ([row["epoch"] for row in history if k in row],
                                   [row[k] for row in history if k in row]) for k in keys}
    line_plot(series, path, title, "epoch", "class threshold tau_c")


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    given = argv if argv is not None else sys.argv[1:]
    print("command: python -m jobs.benchmarks.semi_supervised " + " ".join(shlex.quote(a) for a in given), flush=True)
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    from jobs.config import load_config
    from jobs.runtime import init_ray, setup_logging
    from jobs.train import run_job
    from polyclip.io import atomic_write_json, atomic_write_text
    from polyclip.reports.plots import bar_chart
    from polyclip.reports.tables import markdown_table

    setup_logging()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    results_file = out / "results.json"
    results: list[dict[str, Any]] = json.loads(results_file.read_text()) if results_file.exists() else []
    init_ray(args.address)
    for labels in args.labels:
        for name in args.configs:
            for seed in args.seeds:
                overrides = [f"seed={seed}", f"run.output_dir={out / 'runs'}"]
                if args.epochs:
                    overrides.append(f"train.epochs={args.epochs}")
                    overrides.append(f"train.eval_every={args.epochs}")
                if args.steps:
                    overrides.append(f"train.steps_per_epoch={args.steps}")
                if args.unlabeled:
                    overrides.append(f"data.unlabeled={args.unlabeled}")
                base = load_config(CONFIG_DIR / f"fm{labels}_{name}.yaml", overrides)
                run_name = (f"{base.name}-s{seed}-e{base.train.epochs}x{base.train.steps_per_epoch}"
                            f"-u{base.data.unlabeled}")
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
                else:
                    history = metrics.get("history", [])
                    last = history[-1] if history else {}
                    row.update(test_top1=metrics["test"]["top1"], seconds=round(time.perf_counter() - tic, 1),
                               mask_rate=last.get("mask_rate"), pseudo_acc=last.get("pseudo_acc"),
                               teacher_mask_rate=last.get("teacher_mask_rate"),
                               teacher_pseudo_acc=last.get("teacher_pseudo_acc"))
                    report = teacher_report(metrics)
                    if report is not None:
                        first = report["thresholds"][0]
                        row.update(teacher_pool_acc=report["teacher_accuracy"], teacher_accepted=first["accepted"],
                                   teacher_precision=first["precision"], never_passing=first["never_passing"],
                                   teacher_per_class_precision={k: v["precision"]
                                                                for k, v in first["per_class"].items()})
                    if any(k.startswith("threshold/") for k in last):
                        plot_thresholds(history, out / f"thresholds_{cfg.name}.png",
                                        f"class-aware thresholds, {cfg.name}")
                    print(f"{cfg.name}: test top1 {row['test_top1']:.4f} in {row['seconds']} s", flush=True)
                results = [r for r in results if r["run"] != row["run"]] + [row]
                atomic_write_json(results_file, results)
    ok = [r for r in results if "test_top1" in r]
    groups: dict[str, list[float]] = {}
    for r in ok:
        groups.setdefault(f"{r['labels']}/{r['config']}", []).append(r["test_top1"])
    if groups:
        bar_chart({k: statistics.median(v) for k, v in sorted(groups.items())}, out / "accuracy.png",
                  "Fashion-MNIST test top-1 (median over seeds)", "test top-1")
    columns = ["labels", "config", "seed", "test_top1", "steps", "epochs", "steps_per_epoch", "batch", "mu",
               "unlabeled_pool", "mask_rate", "pseudo_acc", "teacher_accepted", "teacher_precision",
               "never_passing", "seconds", "error"]
    table = markdown_table([{c: r.get(c, "") for c in columns} for r in results])
    atomic_write_text(out / "results.md", "# Semi-supervised Fashion-MNIST\n\n" + table + "\n")
    print(table)
    return {"results": results}


if __name__ == "__main__":
    main(sys.argv[1:])
