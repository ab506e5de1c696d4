"""Fault injection: a training run whose Ray Train worker is SIGKILLed K times at random moments.

Runs ``jobs.train`` on ``jobs/configs/fault_injection.yaml`` (tiny CNN, synthetic images, a
checkpoint every epoch) with ``--epochs`` epochs on a local Ray instance, while a thread kills
the run's worker ``--kills`` times (``jobs.worker_faults.WorkerKiller``): before each kill it
waits for one more checkpointed epoch than at the previous kill, then a uniformly random
0.1-0.9 of an epoch, so kills land anywhere inside an epoch. ``run.max_failures`` is set to
``--kills``. The same config then runs without faults, and the two are compared.

Reported: kills, resumes (the epochs the run restarted from, recorded by the trainer in
``resumes.json`` of the final checkpoint), reported epochs lost (registered by Ray Train
before a kill but not resumed from: should be 0), epochs redone (finished and uploaded by
the worker, but not yet registered by the controller, which polls every 2 s, when the worker
died), epochs whose history differs between the killed and the clean run, final test
accuracy of both, and wall time of both. By default on Fashion-MNIST (20 labels per class,
2,000 test images), so that accuracy is not trivially 1.

Usage::

    python -m jobs.benchmarks.fault_injection [--kills 3] [--epochs 12] [--seed 0]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import time
from pathlib import Path
from typing import Any

from jobs import train
from jobs.benchmarks.common import announce, out_dir, write_results
from jobs.config import load_config
from jobs.worker_faults import WorkerKiller, start_local_ray
from polyclip.reports.plots import line_plot
from polyclip.reports.tables import markdown_table

CONFIG = "jobs/configs/fault_injection.yaml"


def run(name: str, overrides: list[str], kills: int, rng: random.Random) -> dict[str, Any]:
    """One ``jobs.train`` run, with ``kills`` injected faults (0: a clean run)."""
    args = ["--config", CONFIG, f"name={name}", *overrides]
    cfg = load_config(CONFIG, args[2:])
    if cfg.run_dir.exists():
        shutil.rmtree(cfg.run_dir)  # a fresh run, not a resumption of the previous benchmark
    killer = WorkerKiller(Path(str(cfg.run.storage_path)) / cfg.name, kills=kills, min_epochs=1,
                          delay=lambda h: rng.uniform(0.1, 0.9) * float(h[-1]["epoch_seconds"]), timeout=1200)
    load = os.getloadavg()[0]
    tic = time.perf_counter()
    if kills:
        killer.start()
    try:
        metrics = train.main(args)
    finally:
        killer.stop()
        if kills:
            killer.join(timeout=10)
    wall = time.perf_counter() - tic
    if killer.error is not None:
        raise RuntimeError(f"fault injection failed: {killer.error}")
    resumes = json.loads((cfg.run_dir / "checkpoint" / "resumes.json").read_text())
    return {"metrics": metrics, "kills": killer.done, "resumes": resumes, "wall_seconds": wall, "load_1min": load,
            "run_dir": str(cfg.run_dir)}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--kills", type=int, default=3)
    parser.add_argument("--epochs", type=int, default=12)
    parser.add_argument("--seed", type=int, default=0, help="of the kill times")
    parser.add_argument("--dataset", default="fashion_mnist", help="data.dataset of the runs")
    parser.add_argument("--test-limit", type=int, default=2000)
    args = parser.parse_args(argv)
    if args.kills < 1 or args.epochs <= args.kills:
        parser.error(f"need --kills >= 1 and --epochs > --kills (got {args.kills}, {args.epochs})")
    return args


def compare_runs(faulty: dict[str, Any], clean: dict[str, Any], args: argparse.Namespace
                 ) -> tuple[list[dict[str, Any]], list[dict[str, Any]], dict[str, Any]]:
    """Per kill: where it struck and what it cost; the killed vs clean summary; the report's figures."""
    kills = faulty["kills"]
    resumes = faulty["resumes"]
    # Registered by Ray but not resumed from (lost), and written by the worker but not resumed from (redone).
    lost = [kill.completed_epochs - start for kill, start in zip(kills, resumes)]
    redone = [kill.written_epochs - start for kill, start in zip(kills, resumes)]
    hist_f, hist_c = faulty["metrics"]["history"], clean["metrics"]["history"]
    keys = ("train_loss", "val_loss", "val_acc")
    differing = [h["epoch"] for h, c in zip(hist_f, hist_c) if any(h.get(k) != c.get(k) for k in keys)]
    rows = [{"kill": i + 1, "at_s": k.time, "epochs_registered": k.completed_epochs,
             "epochs_written": k.written_epochs, "resumed_from_epoch": resumes[i] if i < len(resumes) else None,
             "reported_epochs_lost": lost[i] if i < len(lost) else None,
             "finished_epochs_redone": redone[i] if i < len(redone) else None} for i, k in enumerate(kills)]
    figures = {
        "epochs": args.epochs, "seed": args.seed,
        "kills": len(kills), "resumes": len(resumes), "resumed_from_epochs": resumes,
        "reported_epochs_lost": sum(lost), "finished_epochs_redone": sum(redone),
        "epochs_in_history": [h["epoch"] for h in hist_f],
        "epochs_differing_from_clean_run": differing,
        "test_top1": {"killed": faulty["metrics"]["test"]["top1"], "clean": clean["metrics"]["test"]["top1"]},
        "wall_seconds": {"killed": faulty["wall_seconds"], "clean": clean["wall_seconds"]},
        "load_1min": {"killed": faulty["load_1min"], "clean": clean["load_1min"]},
    }
    summary_rows = [
        {"run": "killed", "kills": len(kills), "resumes": len(resumes), "reported epochs lost": sum(lost),
         "finished epochs redone": sum(redone),
         "test top1": figures["test_top1"]["killed"], "wall s": faulty["wall_seconds"], "load": faulty["load_1min"]},
        {"run": "clean", "kills": 0, "resumes": 0, "reported epochs lost": 0, "finished epochs redone": 0,
         "test top1": figures["test_top1"]["clean"], "wall s": clean["wall_seconds"], "load": clean["load_1min"]},
    ]
    return rows, summary_rows, figures


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    command = announce(argv, "jobs.benchmarks.fault_injection")
    out = out_dir("fault_injection")
    overrides = [f"train.epochs={args.epochs}", f"run.max_failures={args.kills}", f"data.dataset={args.dataset}",
                 f"data.test_limit={args.test_limit}",
                 f"run.output_dir={out / 'runs'}", f"run.feature_store={out / 'cache'}"]
    start_local_ray(2)
    faulty = run("killed", overrides, args.kills, random.Random(args.seed))
    clean = run("clean", overrides, 0, random.Random(args.seed))
    rows, summary_rows, figures = compare_runs(faulty, clean, args)
    in_history, differing = figures["epochs_in_history"], figures["epochs_differing_from_clean_run"]
    md = write_results(out, command, rows, title="Fault injection: SIGKILL of the Ray Train worker in the middle of "
                       "epochs", extra=figures, floatfmt=".2f", blocks=[
        f"`{CONFIG}` on {args.dataset} with {args.epochs} epochs, `run.max_failures={args.kills}`, one worker, "
        f"local Ray with 2 CPUs shared with other jobs (1-min load average at the start of each run in the table). "
        f"Each kill: SIGKILL of the `ray::RayTrainWorker` process 0.1-0.9 of an epoch after Ray Train registered "
        f"a new checkpoint.\n",
        markdown_table(summary_rows, floatfmt=".3f"), rows,
        f"Epochs in the killed run's history: {in_history} (each exactly once: "
        f"{in_history == list(range(1, args.epochs + 1))}). Epochs whose train/val loss or val "
        f"accuracy differ from the clean run: {differing or 'none'}.\n"])
    hist_f, hist_c = faulty["metrics"]["history"], clean["metrics"]["history"]
    line_plot({name: ([h["epoch"] for h in hist], [h.get("val_acc", float("nan")) for h in hist])
               for name, hist in (("killed", hist_f), ("clean", hist_c))},
              out / "val_acc.png", f"Validation accuracy, {figures['kills']} kills vs none", "epoch", "val acc")
    print(md)
    return {"command": command, "rows": rows, **figures}


if __name__ == "__main__":
    main()
