"""Images per second of a FixMatch training step vs a supervised step, side by side.

Usage::

    python -m jobs.benchmarks.fixmatch_throughput [--backbone random:small_cnn@16] [--batch 32] [--mu 7]
        [--repeats 5] [--steps 3] [--threads 1] [--out runs/benchmarks/fixmatch_throughput]

Same model, same labeled batch ``B``, same thread count, in one process; the two step
kinds alternate within every repeat so CPU contention hits both alike. A step is forward
+ backward + optimiser step + EMA update. Counting: a FixMatch step processes ``B``
labeled + ``mu * B`` unlabeled images (each unlabeled image is augmented twice and goes
through the model twice, weak and strong views); a supervised step processes ``B``
labeled images. Reported: images/s by that count, and model forward passes per second
(``B + 2 mu B`` vs ``B``). Medians over repeats; the ratio is of the medians.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from typing import Any

import torch

from jobs.benchmarks.common import announce, out_dir, write_results


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--backbone", default="random:small_cnn@16")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--mu", type=int, default=7)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--steps", type=int, default=3, help="timed steps per repeat and kind")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", default="runs/benchmarks/fixmatch_throughput")
    return parser.parse_args(argv)


def time_steps(task: torch.nn.Module, batch: dict[str, torch.Tensor], steps: int) -> float:
    """Seconds for ``steps`` full training steps (forward, backward, SGD step, EMA update)."""
    optimizer = torch.optim.SGD([p for p in task.parameters() if p.requires_grad], lr=0.01, momentum=0.9,
                                nesterov=True)
    task.train()
    tic = time.perf_counter()
    for _ in range(steps):
        loss = task(batch)["loss"]
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        task.after_optimizer_step()  # type: ignore[operator]
    return time.perf_counter() - tic


def make_tasks(args: argparse.Namespace) -> tuple[torch.nn.Module, torch.nn.Module, dict[str, torch.Tensor], int]:
    """FixMatch and the supervised baseline of the semi configs on one encoder, a random batch, the image size."""
    from polyclip.augment.fixmatch import fixmatch_weak
    from polyclip.backbones import create_backbone
    from polyclip.methods.fixmatch import FixMatchTask
    from polyclip.methods.pseudo_label import PseudoLabelTask

    in_chans = 1  # Fashion-MNIST's; the factory keeps a pretrained encoder's own channels
    backbone = create_backbone(args.backbone, in_chans=in_chans)
    size = backbone.preprocessing.image_size
    chans = backbone.preprocessing.in_chans
    g = torch.Generator().manual_seed(0)
    b, m = args.batch, args.mu * args.batch
    batch = {"x": torch.randint(0, 256, (b, chans, size, size), dtype=torch.uint8, generator=g),
             "y": torch.randint(0, 10, (b,), generator=g),
             "u_x": torch.randint(0, 256, (m, chans, size, size), dtype=torch.uint8, generator=g)}
    fixmatch = FixMatchTask(backbone, 10)
    # The supervised baseline of the semi configs: same encoder copy, weak augmentation, EMA.
    supervised = PseudoLabelTask(create_backbone(args.backbone, in_chans=in_chans), 10, augment=fixmatch_weak(),
                                 pseudo_labels=False)
    supervised.load_state_dict(
        {k: v for k, v in fixmatch.state_dict().items() if k.startswith(("model.", "ema."))}, strict=False)
    return fixmatch, supervised, batch, size


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    command = announce(argv, "jobs.benchmarks.fixmatch_throughput")
    from polyclip.reports.plots import bar_chart

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    fixmatch, supervised, batch, size = make_tasks(args)
    supervised_batch = {"x": batch["x"], "y": batch["y"]}
    b, m = args.batch, args.mu * args.batch
    time_steps(fixmatch, batch, 1)  # warm-up
    time_steps(supervised, supervised_batch, 1)
    fm_rates, sup_rates = [], []
    for _ in range(args.repeats):
        fm_rates.append((b + m) * args.steps / time_steps(fixmatch, batch, args.steps))
        sup_rates.append(b * args.steps / time_steps(supervised, supervised_batch, args.steps))
    fm, sup = statistics.median(fm_rates), statistics.median(sup_rates)
    rows = [
        {"step": "fixmatch", "images_per_step": b + m, "forward_images_per_step": b + 2 * m,
         "images_per_s": fm, "forward_images_per_s": fm * (b + 2 * m) / (b + m), "steps_per_s": fm / (b + m)},
        {"step": "supervised", "images_per_step": b, "forward_images_per_step": b,
         "images_per_s": sup, "forward_images_per_s": sup, "steps_per_s": sup / b},
    ]
    extra = {"backbone": args.backbone, "image_size": size, "batch": b, "mu": args.mu, "threads": args.threads,
             "repeats": args.repeats, "steps_per_repeat": args.steps,
             "fixmatch_images_per_s_all": fm_rates, "supervised_images_per_s_all": sup_rates,
             "ratio_images_per_s_fixmatch_over_supervised": fm / sup,
             "ratio_steps_per_s_fixmatch_over_supervised": (fm / (b + m)) / (sup / b)}
    out = out_dir(args.out)
    text = write_results(out, command, rows, title="FixMatch vs supervised step throughput", extra=extra, blocks=[
        f"`{args.backbone}` at {size} px, B={b}, mu={args.mu}, {args.threads} thread(s), median of {args.repeats} "
        f"repeats x {args.steps} steps (CPU shared with other jobs).\n", rows,
        f"FixMatch / supervised images/s: {extra['ratio_images_per_s_fixmatch_over_supervised']:.3f}; steps/s: "
        f"{extra['ratio_steps_per_s_fixmatch_over_supervised']:.3f}\n"])
    bar_chart({"fixmatch (B + mu B)": fm, "supervised (B)": sup}, out / "throughput.png",
              "training images per second", "images/s")
    print(text)
    return {"command": command, "rows": rows, **extra}


if __name__ == "__main__":
    main(sys.argv[1:])
