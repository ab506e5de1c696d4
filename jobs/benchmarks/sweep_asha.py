"""Wall time of a sweep with ASHA vs the same trials run to the end; best vs default configuration.

The same fixed list of configurations (drawn once with ``--seed``, the base job's own
values first as the *default configuration*) goes to Optuna as ``points_to_evaluate`` in
both sweeps, with the same job seed, so the two sweeps train exactly the same trials;
only the scheduler differs (ASHA vs none). Each pair runs back to back, ``--repeats``
times, and the report gives medians and the ratio. From the run-to-the-end sweep it also
reports the test accuracy of the best trial (chosen on validation accuracy) vs the
default configuration's.

Default workload: ``jobs/configs/sweeps/probe_small.yaml`` - a probe on cached
EfficientNet-Lite0 features (112 px) of Fashion-MNIST, 10 labels per class; features are
encoded once (the first run pays for it, outside the timed sweeps).

Usage::

    python -m jobs.benchmarks.sweep_asha [--sweep jobs/configs/sweeps/probe_small.yaml] [--samples 6]
        [--epochs 6] [--repeats 1] [--seed 0] [--address ADDR]

CPU here is shared with other jobs: budgets are modest and wall times noisy.
"""

from __future__ import annotations

import argparse
import json
import time
from typing import Any

import numpy as np

from jobs.benchmarks.common import announce, median, out_dir, write_results
from jobs.runtime import init_ray, setup_logging
from jobs.sweep_config import ParamSpace, SweepConfig, get_dotted, load_sweep
from polyclip.reports.plots import bar_chart

NAME = "sweep_asha"


def draw_points(space: dict[str, ParamSpace], base: dict[str, Any], n: int, seed: int) -> list[dict[str, Any]]:
    """``n`` configurations: the base job's values first (where inside the space), then seeded draws."""
    from jobs.config import parse_config

    rng = np.random.default_rng(seed)
    dumped = parse_config(base).dump()
    default = {}
    for key, spec in space.items():
        value = get_dotted(dumped, key)
        default[key] = value if spec.default_in_range(value) else None
    points = []
    for i in range(n):
        point: dict[str, Any] = {}
        for key, spec in space.items():
            if i == 0 and default[key] is not None:
                point[key] = default[key]
            elif spec.type == "choice":
                point[key] = (spec.values or [])[int(rng.integers(len(spec.values or [])))]
            elif spec.type == "int":
                point[key] = int(rng.integers(int(spec.low or 0), int(spec.high or 0) + 1))
            elif spec.type == "loguniform":
                point[key] = float(np.exp(rng.uniform(np.log(spec.low or 1), np.log(spec.high or 1))))
            else:
                point[key] = float(rng.uniform(spec.low or 0, spec.high or 0))
        points.append(point)
    return points


def run_pair(sweep: SweepConfig, job: dict[str, Any], points: list[dict[str, Any]], repeat: int,
             grace: int) -> dict[str, Any]:
    from jobs.sweep import run_sweep

    out: dict[str, Any] = {}
    for label, scheduler in (("asha", {"kind": "asha", "grace_period": grace, "reduction_factor": 2}),
                             ("to_the_end", {"kind": "none"})):
        variant = SweepConfig.model_validate({**sweep.dump(), "name": f"{NAME}-{label}-r{repeat}",
                                              "scheduler": scheduler, "points_to_evaluate": points,
                                              "num_samples": len(points), "output_dir": str(out_dir(NAME))})
        tic = time.perf_counter()
        result = run_sweep(variant, job, fresh=True)
        result["wall_s"] = time.perf_counter() - tic
        out[label] = result
    return out


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m jobs.benchmarks.sweep_asha", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sweep", default="jobs/configs/sweeps/probe_small.yaml")
    parser.add_argument("--samples", type=int, default=6)
    parser.add_argument("--epochs", type=int, default=6)
    parser.add_argument("--grace", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--address", default=None)
    return parser.parse_args(argv)


def warm_features(job: dict[str, Any]) -> float:
    """Encode (and cache) the job's features once, outside the timed sweeps; the seconds it took."""
    from jobs.config import parse_config
    from jobs.sweep import _absolute_paths, prepare_recording_reads

    tic = time.perf_counter()
    prepare_recording_reads(parse_config(_absolute_paths(job)))
    return time.perf_counter() - tic


def compare(pairs: list[dict[str, Any]], points: list[dict[str, Any]]) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """ASHA vs to-the-end: wall time and epochs trained (rows), and the report's figures."""
    asha_s = [p["asha"]["wall_s"] for p in pairs]
    full_s = [p["to_the_end"]["wall_s"] for p in pairs]
    last = pairs[-1]["to_the_end"]
    default_row, best = last["trials"][0], last["best"]
    asha_epochs = [sum(r["epochs"] for r in p["asha"]["trials"]) for p in pairs]
    full_epochs = [sum(r["epochs"] for r in p["to_the_end"]["trials"]) for p in pairs]
    figures = {
        "wall_s": {"asha": asha_s, "to_the_end": full_s, "median_asha": median(asha_s),
                   "median_to_the_end": median(full_s), "ratio_asha_over_full": median(asha_s) / median(full_s)},
        "trained_epochs": {"asha": asha_epochs, "to_the_end": full_epochs},
        "asha_best": pairs[-1]["asha"]["best"], "full_best": best,
        "default": {"params": points[0], "val_acc": default_row.get("val_acc"),
                    "test_top1": default_row.get("test_top1")},
        "best_vs_default_test_top1": {"best": best["test_top1"], "default": default_row.get("test_top1")},
    }
    rows = [{"scheduler": "ASHA", "median wall s": median(asha_s), "epochs trained": median(asha_epochs)},
            {"scheduler": "none (to the end)", "median wall s": median(full_s), "epochs trained": median(full_epochs)}]
    return rows, figures


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    setup_logging()
    command = announce(argv, f"jobs.benchmarks.{NAME}")
    sweep, job = load_sweep(args.sweep)
    job.setdefault("train", {})["epochs"] = args.epochs
    points = draw_points(sweep.space, job, args.samples, args.seed)
    init_ray(args.address)
    warm_s = warm_features(job)
    pairs = [run_pair(sweep, job, points, r, args.grace) for r in range(args.repeats)]
    rows, figures = compare(pairs, points)
    folder = out_dir(NAME)
    wall, top1 = figures["wall_s"], figures["best_vs_default_test_top1"]
    bar_chart({"ASHA": wall["median_asha"], "to the end": wall["median_to_the_end"]}, folder / "wall_time.png",
              f"sweep wall time, {args.samples} trials x {args.epochs} epochs (median of {args.repeats})", "seconds")
    bar_chart({"default config": float(top1["default"] or 0.0), "best config": float(top1["best"] or 0.0)},
              folder / "best_vs_default.png", "test accuracy (run to the end)", "top-1")
    # Trial results hold values JSON does not know (timestamps); they are written as text.
    extra = json.loads(json.dumps({"sweep": args.sweep, "samples": args.samples, "epochs": args.epochs,
                                   "repeats": args.repeats, "points": points, "feature_warmup_s": warm_s, **figures},
                                  default=str))
    md = write_results(folder, command, rows, title=NAME, extra=extra, blocks=[
        f"Sweep `{args.sweep}`, {args.samples} fixed configurations x {args.epochs} epochs, same seeds; "
        f"{args.repeats} repeat(s), CPU shared with other jobs.\n", rows,
        f"ASHA / to-the-end wall time: **{wall['ratio_asha_over_full']:.2f}**\n",
        f"Test top-1, default configuration {points[0]}: {top1['default']}; best on validation "
        f"{figures['full_best']['params']}: {top1['best']}\n", "![wall time](wall_time.png)",
        "![best vs default](best_vs_default.png)\n"])
    print(md)
    return {"command": command, "rows": rows, **extra}


if __name__ == "__main__":
    main()
