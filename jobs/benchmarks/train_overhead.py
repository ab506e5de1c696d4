"""Ray Train overhead: one ``TorchTrainer`` worker vs the same training loop in plain PyTorch.

Both sides run polyclip's one fit loop (``polyclip.engine.fit``) over the same ``ArrayLoader`` of Fashion-MNIST
images (28x28, uint8) with the same task (``random:small_cnn`` + linear head, cross-entropy,
Adam), the same seed, batch size, number of steps and torch threads. The Ray side builds the
task inside a ``TorchTrainer`` worker (``ScalingConfig(num_workers=1)``, ``prepare_model``,
``ray.train.report``), exactly like ``jobs/trainer.py`` does.

Two figures, measured side by side with the repeats interleaved (plain, Ray, Ray, plain, ...):

* steady-state throughput (images/s) inside the loop, after ``--warmup`` steps, excluding
  start-up: the median of each side and the ratio Ray / plain (target: 0.95 or more);
* end-to-end wall time of one run: plain = build the task + warm-up + timed steps;
  Ray = ``trainer.fit()`` (controller and worker start-up, payload transfer, report), on an
  already-started Ray instance, whose ``ray.init`` time is reported on its own.

Usage::

    python -m jobs.benchmarks.train_overhead [--repeats 5] [--steps 60] [--threads 1]

The machine's CPUs are shared with other jobs: the load average is recorded with every
repeat, and the ratio is the median of per-repeat ratios of adjacent runs.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from jobs.benchmarks.common import announce, median, out_dir, summary, write_results
from jobs.runtime import setup_logging
from jobs.worker_faults import start_local_ray
from polyclip.backbones import create_backbone
from polyclip.data.datasets import load_dataset
from polyclip.engine import ArrayLoader
from polyclip.engine.fit import FitSettings, TaskData, fit
from polyclip.methods.supervised import SupervisedTask
from polyclip.reports.plots import bar_chart


def timed_training(data: dict[str, np.ndarray], *, spec: str, num_classes: int, batch_size: int, warmup: int,
                   steps: int, threads: int, seed: int, prepare: Any = None) -> dict[str, float]:
    """Build the task, run ``warmup`` steps, then time ``steps`` steps of :func:`polyclip.engine.fit.fit`.

    Args:
        data: ``{"x": uint8 images (N, 1, 28, 28), "y": labels}``.
        prepare: Applied to the task before training (``ray.train.torch.prepare_model`` on the Ray side).

    Returns:
        ``images_per_s`` and ``seconds`` of the timed steps, ``build_seconds`` of the task.
    """
    torch.set_num_threads(threads)
    torch.manual_seed(seed)
    tic = time.perf_counter()
    task: torch.nn.Module = SupervisedTask(create_backbone(spec, in_chans=1), num_classes)
    if prepare is not None:
        task = prepare(task)
    loader = ArrayLoader(data, batch_size, seed=seed, drop_last=True)
    build = time.perf_counter() - tic
    clock = _WarmupClock(warmup)
    # One epoch of warmup + steps; the loss is read back every `warmup` steps, so the clock starts after warm-up.
    settings = FitSettings(epochs=1, steps_per_epoch=warmup + steps, optimizer="adam", lr=1e-3, scheduler="constant",
                           log_every_steps=max(1, warmup), seed=seed, progress=False)
    result = fit(task, TaskData(streams={"": loader}), settings, [clock], device=torch.device("cpu"))
    seconds = clock.end - clock.start
    return {"images_per_s": steps * batch_size / seconds, "seconds": seconds, "build_seconds": build,
            "train_loss": result.history[-1]["train_loss"], "threads": float(torch.get_num_threads())}


class _WarmupClock:
    """Starts at the first loss read-back (after the warm-up steps), stops at the end of the epoch."""

    def __init__(self, warmup: int) -> None:
        self.warmup, self.start, self.end = warmup, 0.0, 0.0

    def on_fit_start(self, state: Any) -> None:
        if self.warmup == 0:
            self.start = time.perf_counter()

    def on_log(self, state: Any, logs: dict[str, float]) -> None:
        if not self.start:
            self.start = time.perf_counter()

    def on_epoch_end(self, state: Any, metrics: dict[str, Any]) -> None:
        self.end = time.perf_counter()


def _ray_worker(config: dict[str, Any]) -> None:
    import ray
    import ray.train
    import ray.train.torch

    data = ray.get(config.pop("data"))
    out = timed_training(data, prepare=ray.train.torch.prepare_model, **config)
    # Ray Train v2 returns the metrics of the last report *with a checkpoint* in ``Result.metrics``.
    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "metrics.json").write_text(json.dumps(out))
        ray.train.report(out, checkpoint=ray.train.Checkpoint.from_directory(tmp))


def ray_run(data_ref: Any, kwargs: dict[str, Any], threads: int, storage: str, name: str) -> dict[str, float]:
    """One ``TorchTrainer`` run with one worker; adds ``wall_seconds`` of ``trainer.fit()``."""
    import ray.train
    from ray.train.torch import TorchTrainer

    trainer = TorchTrainer(
        _ray_worker, train_loop_config={"data": data_ref, **kwargs},
        scaling_config=ray.train.ScalingConfig(num_workers=1, use_gpu=False, resources_per_worker={"CPU": threads}),
        run_config=ray.train.RunConfig(name=name, storage_path=storage),
    )
    tic = time.perf_counter()
    result = trainer.fit()
    wall = time.perf_counter() - tic
    if result.error is not None:
        raise RuntimeError(f"the Ray run {name} failed: {result.error}")
    metrics = result.metrics or {}
    return {**{k: float(v) for k, v in metrics.items() if isinstance(v, (int, float))}, "wall_seconds": wall}


def plain_run(data: dict[str, np.ndarray], kwargs: dict[str, Any]) -> dict[str, float]:
    """The same loop in this process; adds ``wall_seconds`` (build + warm-up + timed steps)."""
    tic = time.perf_counter()
    out = timed_training(data, **kwargs)
    return {**out, "wall_seconds": time.perf_counter() - tic}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--steps", type=int, default=60, help="timed steps per run")
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--threads", type=int, default=1, help="torch threads = CPUs of the Ray worker")
    parser.add_argument("--backbone", default="random:small_cnn")
    parser.add_argument("--images", type=int, default=4096, help="Fashion-MNIST training images used")
    args = parser.parse_args(argv)
    if min(args.repeats, args.steps, args.batch_size, args.threads, args.images) < 1 or args.warmup < 0:
        parser.error("--repeats, --steps, --batch-size, --threads and --images must be >= 1, --warmup >= 0")
    return args


def interleaved_runs(data: dict[str, np.ndarray], kwargs: dict[str, Any], args: argparse.Namespace, storage: str
                     ) -> tuple[list[dict[str, Any]], list[dict[str, float]], list[dict[str, float]]]:
    """``--repeats`` plain and Ray runs, alternating who goes first; the rows, the plain and the Ray results."""
    import ray

    data_ref = ray.put(data)
    rows: list[dict[str, Any]] = []
    plain: list[dict[str, float]] = []
    remote: list[dict[str, float]] = []
    for r in range(args.repeats):
        order = ("plain", "ray") if r % 2 == 0 else ("ray", "plain")
        for side in order:
            load = os.getloadavg()[0]
            res = plain_run(data, kwargs) if side == "plain" else ray_run(data_ref, kwargs, args.threads, storage,
                                                                          f"overhead-{r}")
            (plain if side == "plain" else remote).append(res)
            rows.append({"repeat": r, "side": side, "images_per_s": res["images_per_s"],
                         "timed_seconds": res["seconds"], "wall_seconds": res["wall_seconds"], "load_1min": load})
            print(f"repeat {r} {side:5s}: {res['images_per_s']:8.1f} img/s, wall {res['wall_seconds']:6.2f} s, "
                  f"load {load:.1f}", flush=True)
    return rows, plain, remote


def write_report(out: Path, command: str, args: argparse.Namespace, setup: dict[str, Any], ray_init_seconds: float,
                 rows: list[dict[str, Any]], plain: list[dict[str, float]], remote: list[dict[str, float]]
                 ) -> tuple[dict[str, Any], str]:
    """``results.{json,md}`` and ``throughput.png``; returns the report and its markdown."""
    ratios = [b["images_per_s"] / a["images_per_s"] for a, b in zip(plain, remote)]
    extra: dict[str, Any] = {
        "setup": setup,
        "ray_init_seconds": ray_init_seconds,
        "plain_images_per_s": summary([p["images_per_s"] for p in plain]),
        "ray_images_per_s": summary([p["images_per_s"] for p in remote]),
        "ratio_ray_over_plain": summary(ratios),
        "ratio_of_medians": median([p["images_per_s"] for p in remote]) / median([p["images_per_s"] for p in plain]),
        "plain_wall_seconds": summary([p["wall_seconds"] for p in plain]),
        "ray_wall_seconds": summary([p["wall_seconds"] for p in remote]),
        "load_1min": summary([row["load_1min"] for row in rows]),
    }
    table = [
        {"side": "plain PyTorch", "median img/s": extra["plain_images_per_s"]["median"],
         "median wall s": extra["plain_wall_seconds"]["median"]},
        {"side": "TorchTrainer, 1 worker", "median img/s": extra["ray_images_per_s"]["median"],
         "median wall s": extra["ray_wall_seconds"]["median"]},
    ]
    md = write_results(out, command, rows, title="Ray Train overhead: one TorchTrainer worker vs plain PyTorch",
                       extra=extra, floatfmt=".2f", blocks=[
        f"{args.backbone} on {setup['images']} Fashion-MNIST images, batch {args.batch_size}, {args.steps} timed "
        f"steps after {args.warmup} warm-up steps, {args.threads} torch thread(s), {args.repeats} interleaved "
        f"repeats; Ray {setup['ray']}, torch {torch.__version__}, {os.cpu_count()} CPUs shared with other jobs "
        f"(1-min load average during the runs: median {extra['load_1min']['median']:.1f}).\n", table,
        f"Steady-state throughput ratio Ray / plain: **{extra['ratio_ray_over_plain']['median']:.3f}** "
        f"(median of per-repeat ratios; min {min(ratios):.3f}, max {max(ratios):.3f}; ratio of medians "
        f"{extra['ratio_of_medians']:.3f}). Target: 0.95 or more.\n",
        f"End-to-end wall time of one run: plain {extra['plain_wall_seconds']['median']:.2f} s, "
        f"`trainer.fit()` {extra['ray_wall_seconds']['median']:.2f} s (medians), plus `ray.init` "
        f"{ray_init_seconds:.2f} s once per process.\n", rows])
    sides = {"plain": "plain_images_per_s", "TorchTrainer x1": "ray_images_per_s"}
    bar_chart({k: extra[v]["median"] for k, v in sides.items()}, out / "throughput.png",
              "Steady-state training throughput (median)", "images / s",
              errors={k: extra[v]["std"] for k, v in sides.items()})
    return {"command": command, "rows": rows, **extra}, md


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    setup_logging()
    command = announce(argv, "jobs.benchmarks.train_overhead")
    out = out_dir("train_overhead")
    dataset = load_dataset("fashion_mnist")
    n = min(args.images, len(dataset.train.labels))
    data = {"x": np.ascontiguousarray(dataset.train.images[:n]), "y": dataset.train.labels[:n].astype(np.int64)}
    kwargs = {"spec": args.backbone, "num_classes": dataset.num_classes, "batch_size": args.batch_size,
              "warmup": args.warmup, "steps": args.steps, "threads": args.threads, "seed": 0}
    ray_init_seconds = start_local_ray(max(2, args.threads))
    import ray

    rows, plain, remote = interleaved_runs(data, kwargs, args, str((out / "ray").resolve()))
    setup = {**kwargs, "images": n, "repeats": args.repeats, "torch": torch.__version__, "ray": ray.__version__,
             "cpus": os.cpu_count()}
    report, md = write_report(out, command, args, setup, ray_init_seconds, rows, plain, remote)
    print(md)
    return report


if __name__ == "__main__":
    main()
