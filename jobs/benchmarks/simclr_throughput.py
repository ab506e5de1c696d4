"""SimCLR pretraining throughput (images/s) with 1 and with 2 DDP workers, same global batch.

Usage::

    python -m jobs.benchmarks.simclr_throughput [--global-batch 128] [--steps 4] [--repeats 3]
        [--rounds 2] [--backbone random:small_cnn@16] [--cpus 2]

Each worker runs the real training step of ``SimCLRTask`` (two views, one encoder forward
of 2B images, NT-Xent with negatives gathered from every worker, the online probe on a
labeled batch, backward, Adam step) under ``DistributedDataParallel`` on gloo, the
same process group Ray Train's ``prepare_model`` sets up on CPU; Ray itself is left out
so the figure is the step's cost, not Ray's start-up. The global batch is split evenly
over the workers and the ``--cpus`` cores are split evenly too (1 worker x 2 threads vs
2 workers x 1 thread). Every timing window is ``--steps`` steps after one warm-up step;
``--rounds`` alternate 1 and 2 workers side by side, each with ``--repeats`` windows.
Reported: the median images/s per setting and the ratio of the medians, plus the load
average of the machine (it is shared), in ``runs/benchmarks/simclr_throughput/``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.nn.parallel import DistributedDataParallel

from jobs.benchmarks.common import announce, free_port, out_dir, write_results
from polyclip.augment.simclr import simclr_augment
from polyclip.backbones import create_backbone
from polyclip.methods.simclr import SimCLRTask
from polyclip.reports.plots import bar_chart

NAME = "simclr_throughput"


def _worker(rank: int, world: int, port: int, args: dict[str, Any], out: str) -> None:
    if world > 1:
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        torch.set_num_threads(max(1, args["cpus"] // world))
        torch.manual_seed(0)
        backbone = create_backbone(args["backbone"], in_chans=1).train()
        task: torch.nn.Module = SimCLRTask(backbone, 10, simclr_augment(backbone.preprocessing.image_size, "small"))
        if world > 1:
            task = DistributedDataParallel(task, find_unused_parameters=True)
        optimizer = torch.optim.Adam(task.parameters(), lr=1e-3)
        per_rank = args["global_batch"] // world
        gen = torch.Generator().manual_seed(rank)
        images = torch.randint(0, 256, (per_rank, 1, 28, 28), dtype=torch.uint8, generator=gen)
        labeled = {"x": images[: max(2, per_rank // 4)], "y": torch.arange(max(2, per_rank // 4)) % 10}

        def step() -> None:
            loss = task({"u_x": images, **labeled})["loss"]
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()

        step()  # warm-up
        seconds = []
        for _ in range(args["repeats"]):
            if world > 1:
                dist.barrier()
            tic = time.perf_counter()
            for _ in range(args["steps"]):
                step()
            if world > 1:
                dist.barrier()
            seconds.append(time.perf_counter() - tic)
        if rank == 0:
            Path(out).write_text(json.dumps(seconds))
    finally:
        if world > 1:
            dist.destroy_process_group()


def measure(world: int, args: dict[str, Any]) -> list[float]:
    """Images/s of each timing window with ``world`` workers."""
    with tempfile.TemporaryDirectory() as tmp:
        out = str(Path(tmp) / "seconds.json")
        mp.start_processes(_worker, args=(world, free_port(), args, out), nprocs=world, start_method="spawn")
        seconds = json.loads(Path(out).read_text())
    return [args["global_batch"] * args["steps"] / s for s in seconds]


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog=f"python -m jobs.benchmarks.{NAME}", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--global-batch", type=int, default=128)
    parser.add_argument("--steps", type=int, default=4, help="steps per timing window")
    parser.add_argument("--repeats", type=int, default=3, help="timing windows per round")
    parser.add_argument("--rounds", type=int, default=2, help="alternations of 1 and 2 workers")
    parser.add_argument("--backbone", default="random:small_cnn@16")
    parser.add_argument("--cpus", type=int, default=2, help="cores shared by the workers")
    parser.add_argument("--out", default=f"runs/benchmarks/{NAME}")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    command = announce(argv, f"jobs.benchmarks.{NAME}")
    if args.global_batch % 2:
        raise SystemExit(f"error: --global-batch must split evenly over 2 workers, got {args.global_batch}")
    params = vars(args)
    load_before = os.getloadavg()
    rates: dict[int, list[float]] = {1: [], 2: []}
    for round_ in range(args.rounds):
        for world in (1, 2):
            rates[world] += measure(world, params)
            print(f"round {round_ + 1}, {world} worker(s): {[round(r, 1) for r in rates[world][-args.repeats:]]} img/s",
                  flush=True)
    load_after = os.getloadavg()
    medians = {w: statistics.median(r) for w, r in rates.items()}
    rows = [{"workers": w, "threads_per_worker": max(1, args.cpus // w), "batch_per_worker": args.global_batch // w,
             "median_images_per_s": medians[w], "min": min(rates[w]), "max": max(rates[w]), "windows": len(rates[w])}
            for w in (1, 2)]
    ratio = medians[2] / medians[1]
    out = out_dir(args.out)
    extra = {"ratio_2_over_1": ratio, "rates": rates, "loadavg_before": load_before, "loadavg_after": load_after}
    note = write_results(out, command, rows, title="SimCLR pretraining throughput, 1 vs 2 workers", extra=extra,
                         blocks=[
        f"Encoder `{args.backbone}` at 28 px, global batch {args.global_batch} (two views each), "
        f"{args.steps} steps per window after a warm-up step, {args.repeats} windows x {args.rounds} rounds, "
        f"DDP on gloo over loopback, {args.cpus} cores shared by the workers.\n", rows,
        f"Ratio of medians, 2 workers / 1 worker: **{ratio:.2f}x**.\n",
        f"Load average of the shared machine (1/5/15 min): before {load_before}, after {load_after}; "
        "other jobs ran at the same time, so treat absolute numbers as lower bounds.\n"])
    bar_chart({f"{w} worker(s)": medians[w] for w in (1, 2)}, out / "throughput.png",
              title="SimCLR pretraining, median images/s", ylabel="images/s")
    print(note)
    return {"command": command, "rows": rows, **extra}


if __name__ == "__main__":
    main()
