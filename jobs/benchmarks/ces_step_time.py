"""Training-step time of CES over cross-entropy: same model, same batch, interleaved side by side.

Usage::

    python -m jobs.benchmarks.ces_step_time [--repeats 150] [--batch-size 64] [--backbone random:small_cnn@16]

A step is what the generic loop does: forward (uint8 images -> logits -> loss), backward,
optimiser step. CE and CES steps alternate (CE, CES, CE, CES, ...) on two copies of the
same model and the same Fashion-MNIST batch, so load from other processes hits both
alike; the figure is the median over repeats of the per-pair ratio CES / CE (and the
ratio of the medians). CES uses the label similarity matrix as a buffer (gathered on the
device), built once from GloVe before timing. For contrast the script also times the
loss alone, and the per-sample word-vector look-up of the original CES implementation
(gensim ``similarity(true word, predicted word)`` for each example) that made 12 epochs
take two days.

Figures: ``runs/benchmarks/ces_step_time/`` (``ces_step_time.md``, ``.json``, ``.png``).
"""

from __future__ import annotations

import argparse
import copy
import time
from typing import Any

import numpy as np
import torch
from torch import nn

from jobs.benchmarks.common import announce, median, out_dir, summary, write_results
from jobs.config import WordVectorsSection
from jobs.semantics import label_similarity
from polyclip.backbones import create_backbone
from polyclip.data.datasets import load_dataset
from polyclip.losses.ces import CESLoss
from polyclip.methods.supervised import SupervisedTask
from polyclip.reports.plots import bar_chart


def _step(task: nn.Module, optimizer: torch.optim.Optimizer, batch: dict[str, torch.Tensor]) -> float:
    tic = time.perf_counter()
    loss = task(batch)["loss"]
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    return time.perf_counter() - tic


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=150)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--backbone", default="random:small_cnn@16")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--mode", default="soft", choices=["soft", "hard"])
    return parser.parse_args(argv)


def time_steps(args: argparse.Namespace, num_classes: int, batch: dict[str, torch.Tensor],
               similarity: torch.Tensor) -> dict[str, list[float]]:
    """Seconds of CE and CES training steps on copies of one model, interleaved, after the warm-up."""
    base = SupervisedTask(create_backbone(args.backbone, in_chans=1), num_classes)
    ce_task = copy.deepcopy(base)
    ces_task = copy.deepcopy(base)
    ces_task.loss_fn = CESLoss(similarity, w_ce=0.8, w_sim=0.2, mode=args.mode)
    opts = {name: torch.optim.Adam(t.parameters(), lr=1e-3) for name, t in (("ce", ce_task), ("ces", ces_task))}
    tasks = {"ce": ce_task, "ces": ces_task}
    times: dict[str, list[float]] = {"ce": [], "ces": []}
    for i in range(args.warmup + args.repeats):
        order = ("ce", "ces") if i % 2 == 0 else ("ces", "ce")  # alternate who goes first
        for name in order:
            t = _step(tasks[name], opts[name], batch)
            if i >= args.warmup:
                times[name].append(t)
    return times


def time_losses(logits: torch.Tensor, y: torch.Tensor, similarity: torch.Tensor, mode: str
                ) -> dict[str, list[float]]:
    """Seconds of the loss alone (logits -> loss -> backward), CE and CES, 300 times each."""
    ce_fn, ces_fn = nn.CrossEntropyLoss(), CESLoss(similarity, mode=mode)
    loss_times: dict[str, list[float]] = {"ce": [], "ces": []}
    for _ in range(300):
        for name, fn in (("ce", ce_fn), ("ces", ces_fn)):
            tic = time.perf_counter()
            fn(logits, y).backward()
            loss_times[name].append(time.perf_counter() - tic)
    return loss_times


def time_lookup(logits: torch.Tensor, y: torch.Tensor, class_names: list[str]) -> list[float]:
    """Seconds of the original CES's per-sample gensim similarity look-up of one batch, 20 times."""
    from polyclip.text import DEFAULT_WORD_VECTORS, load_word_vectors, resolve_labels

    kv = load_word_vectors(DEFAULT_WORD_VECTORS)
    words = [" ".join(w) for w in resolve_labels(class_names, kv)]
    lookup_times = []
    for _ in range(20):
        pred = logits.detach().argmax(1).tolist()
        tic = time.perf_counter()
        sims = [kv.n_similarity(words[t].split(), words[p].split()) for t, p in zip(y.tolist(), pred, strict=True)]
        torch.tensor(sims)
        lookup_times.append(time.perf_counter() - tic)
    return lookup_times


def write_report(command: str, args: argparse.Namespace, times: dict[str, list[float]],
                 loss_times: dict[str, list[float]], lookup_times: list[float]) -> tuple[dict[str, Any], str]:
    """``ces_step_time.{json,md,png}``; returns the report and its markdown."""
    pair_ratio = [b / a for a, b in zip(times["ce"], times["ces"], strict=True)]
    extra = {
        "args": vars(args),
        "step_seconds": {k: summary(v) for k, v in times.items()},
        "ratio_of_medians": median(times["ces"]) / median(times["ce"]),
        "median_pair_ratio": median(pair_ratio),
        "pair_ratio": summary(pair_ratio),
        "loss_only_seconds": {k: summary(v) for k, v in loss_times.items()},
        "per_sample_lookup_seconds": summary(lookup_times),
        "target_met": median(pair_ratio) <= 1.05,
    }
    folder = out_dir("ces_step_time")
    bar_chart({"CE step (ms)": 1e3 * median(times["ce"]), "CES step (ms)": 1e3 * median(times["ces"])},
              folder / "ces_step_time.png", title=f"Training step, {args.backbone}, batch {args.batch_size}",
              ylabel="median ms per step")
    rows = [
        {"what": "training step, CE", "median_ms": 1e3 * median(times["ce"]), "n": len(times["ce"])},
        {"what": "training step, CES (similarity buffer)", "median_ms": 1e3 * median(times["ces"]),
         "n": len(times["ces"])},
        {"what": "loss + backward only, CE", "median_ms": 1e3 * median(loss_times["ce"]), "n": 300},
        {"what": "loss + backward only, CES", "median_ms": 1e3 * median(loss_times["ces"]), "n": 300},
        {"what": "per-sample gensim look-up of the batch (original CES)", "median_ms": 1e3 * median(lookup_times),
         "n": len(lookup_times)},
    ]
    md = write_results(folder, command, rows, title="CES vs cross-entropy: training-step time", extra=extra,
                       stem="ces_step_time", floatfmt=".3f", blocks=[
        f"Backbone `{args.backbone}`, batch {args.batch_size} Fashion-MNIST images, {args.threads} torch "
        f"thread(s), CES mode `{args.mode}`, {args.repeats} interleaved pairs after {args.warmup} warm-up. "
        "The CPU is shared with other jobs, so absolute times are noisy; the pairs are interleaved so "
        "the ratio is not.\n", rows,
        f"**CES / CE step time: median of paired ratios {median(pair_ratio):.4f}, ratio of medians "
        f"{extra['ratio_of_medians']:.4f}** (target <= 1.05: {'met' if extra['target_met'] else 'NOT met'}).\n",
        "![step time](ces_step_time.png)\n"])
    return {"command": command, "rows": rows, **extra}, md


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    command = announce(argv, "jobs.benchmarks.ces_step_time")
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    dataset = load_dataset("fashion_mnist")
    idx = np.random.default_rng(0).choice(len(dataset.train.labels), args.batch_size, replace=False)
    batch = {"x": torch.as_tensor(dataset.train.images[idx]), "y": torch.as_tensor(dataset.train.labels[idx])}
    similarity = torch.as_tensor(label_similarity(WordVectorsSection(), dataset.class_names))
    times = time_steps(args, dataset.num_classes, batch, similarity)
    # The loss alone (logits -> loss -> backward), and the original per-sample word-vector look-up.
    logits = torch.randn(args.batch_size, dataset.num_classes, requires_grad=True)
    loss_times = time_losses(logits, batch["y"], similarity, args.mode)
    lookup_times = time_lookup(logits, batch["y"], dataset.class_names)
    report, md = write_report(command, args, times, loss_times, lookup_times)
    print(md)
    return report


if __name__ == "__main__":
    main()
