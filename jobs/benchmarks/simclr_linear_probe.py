"""Linear-probe accuracy of a SimCLR encoder on Fashion-MNIST vs random init vs EfficientNet-Lite0.

Usage::

    python -m jobs.benchmarks.simclr_linear_probe [--pool 5000] [--epochs 3] [--labels 10 600]
        [--test-limit 2000] [--lite-size 64] [--seeds 0 1 2] [dotted.key=value ...]

1. Pretrains the SimCLR task of ``jobs/configs/simclr/pretrain_fmnist.yaml`` (the same
   recipe, task, augmentation and training loop a ``jobs.train`` run uses; here in this
   process, without Ray, so that a loaded shared machine cannot fail Ray's start-up) on
   ``--pool`` unlabeled train images, no labels, for ``--epochs`` epochs; the budget is
   reported in epochs, images seen and minutes.
2. Encodes labeled and test images with the SimCLR encoder, the same architecture at
   random init (same seed), and EfficientNet-Lite0 (ImageNet) at ``--lite-size`` px.
3. Trains a linear probe (``ProbeTask``: L2-normalised features, Adam) per label budget
   and seed; reports the median test accuracy over seeds.

Writes ``runs/benchmarks/simclr_linear_probe/{results.md,results.json,linear_probe.png}``
and the encoder under ``encoder/`` (``create_backbone("checkpoint:<that dir>")``).
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from jobs.benchmarks.common import announce, out_dir, write_results
from jobs.config import load_config
from jobs.data import load_data, prepare_payload
from jobs.recipes import RECIPES
from jobs.runtime import setup_logging
from jobs.trainer import build_streams, fit_settings
from polyclip.backbones import Backbone, arch_spec, create_backbone, load_backbone, save_backbone
from polyclip.data.splits import Split, make_split
from polyclip.engine import evaluate
from polyclip.engine.fit import EvalSet, TaskData, fit, fit_arrays
from polyclip.features.cache import encode_images
from polyclip.methods.probe import ProbeTask
from polyclip.methods.simclr import SimCLRTask
from polyclip.reports.plots import bar_chart

logger = logging.getLogger("polyclip")
NAME = "simclr_linear_probe"
CONFIG = "jobs/configs/simclr/pretrain_fmnist.yaml"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog=f"python -m jobs.benchmarks.{NAME}", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default=CONFIG, help="SimCLR pretraining job config")
    parser.add_argument("--pool", type=int, default=5000, help="unlabeled images to pretrain on")
    parser.add_argument("--epochs", type=int, default=3, help="pretraining epochs")
    parser.add_argument("--labels", type=int, nargs="+", default=[10, 600],
                        help="labels per class for the probe (-1: every train image)")
    parser.add_argument("--test-limit", type=int, default=2000, help="test images (stratified); 0 for all 10k")
    parser.add_argument("--lite-size", type=int, default=64, help="EfficientNet-Lite0 input side")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="label draws of the probe")
    parser.add_argument("--probe-epochs", type=int, default=100)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", default=f"runs/benchmarks/{NAME}")
    parser.add_argument("--encoder", default=None,
                        help="reuse an encoder this benchmark saved (<out>/encoder; its budget is read from "
                             "<out>/results.json) instead of pretraining again")
    parser.add_argument("overrides", nargs="*", help="dotted overrides of the pretraining config")
    return parser.parse_args(argv)


def reuse_encoder(folder: Path) -> tuple[Backbone, dict[str, Any]]:
    """An encoder saved by an earlier run, with that run's pretraining budget."""
    previous = folder.parent / "results.json"
    if not (folder / "backbone.pt").is_file() or not previous.is_file():
        raise SystemExit(f"error: --encoder {folder}: expected <out>/encoder/backbone.pt and <out>/results.json "
                         "from an earlier run of this benchmark")
    budget = json.loads(previous.read_text())["budget"]
    return load_backbone(str(folder)).eval(), {**budget, "reused_from": str(folder)}


def pretrain(cfg: Any, out: Path) -> tuple[Backbone, dict[str, Any]]:
    """Train the config's SimCLR task in this process; return the encoder and the budget."""
    dataset, split = load_data(cfg)
    payload = prepare_payload(cfg, dataset, split, {})
    recipe = RECIPES[cfg.method.name]
    torch.manual_seed(cfg.seed)
    built = recipe.build_task(cfg, cfg.method, payload)
    if not isinstance(built, SimCLRTask):
        raise ValueError(f"{cfg.name}: method {cfg.method.name!r} is not SimCLR")
    task: SimCLRTask = built
    # The same streams and settings as the Ray job (jobs/trainer.py), on one in-process worker.
    streams = build_streams(cfg, recipe, payload, 0, 1, {}, torch.device("cpu"))
    val = payload.val
    tic = time.perf_counter()
    result = fit(task, TaskData(streams=streams, val=EvalSet(val["x"], val["y"])), fit_settings(cfg))
    history, steps = result.history, result.state.steps_per_epoch
    minutes = (time.perf_counter() - tic) / 60
    save_backbone(task.backbone.cpu(), out / "encoder")
    pool = len(payload.unlabeled["x"])
    budget = {"epochs": cfg.train.epochs, "pool_images": pool, "steps": steps * cfg.train.epochs,
              "batch_size": cfg.train.batch_size, "images_seen": pool * cfg.train.epochs,
              "minutes": round(minutes, 2), "backbone": cfg.backbone.spec, "history": history}
    return task.backbone.eval(), budget


def linear_probe(train_x: np.ndarray, train_y: np.ndarray, test_x: np.ndarray, test_y: np.ndarray, *,
                 epochs: int, seed: int) -> float:
    """Test accuracy of a linear probe (``ProbeTask``, Adam 1e-2 with cosine decay)."""
    torch.manual_seed(seed)
    task = ProbeTask(train_x.shape[1], int(train_y.max()) + 1)
    fit_arrays(task, {"x": train_x, "y": train_y}, epochs=epochs, batch_size=256, optimizer="adam", lr=1e-2,
               scheduler="cosine", seed=seed)
    task.eval()
    logits = evaluate(task.predict, test_x, device=torch.device("cpu"))
    return float((logits.argmax(1) == test_y).mean())


def probe_splits(dataset: Any, args: argparse.Namespace) -> dict[tuple[int, int], Split]:
    """A split per (labels per class, seed): the probe's labeled images and the stratified test images."""
    assert dataset.test is not None
    return {(k, seed): make_split(dataset.train.labels, dataset.class_names, labels_per_class=k, seed=seed,
                                  val_per_class=0 if k < 0 else 50, test_labels=dataset.test.labels,
                                  test_limit=args.test_limit or None)
            for k in args.labels for seed in args.seeds}


def probe_encoder(name: str, backbone: Backbone, dataset: Any, splits: dict[tuple[int, int], Split],
                  args: argparse.Namespace) -> tuple[list[dict[str, Any]], dict[str, dict[str, Any]]]:
    """Linear-probe test accuracy of one encoder at every labels-per-class, over the seeds: rows and results."""
    test_pool = dataset.test
    train_idx = np.unique(np.concatenate([s.labeled for s in splits.values()]))
    test_idx = np.unique(np.concatenate([s.test for s in splits.values()]))
    tic = time.perf_counter()
    feats_train = encode_images(backbone, dataset.train.images[train_idx], batch_size=256)
    feats_test = encode_images(backbone, test_pool.images[test_idx], batch_size=256)
    encode_s = time.perf_counter() - tic
    logger.info("%s: encoded %d images in %.0f s", name, len(train_idx) + len(test_idx), encode_s)
    pos_train = {int(i): p for p, i in enumerate(train_idx)}
    pos_test = {int(i): p for p, i in enumerate(test_idx)}
    rows: list[dict[str, Any]] = []
    results: dict[str, dict[str, Any]] = {}
    for k in args.labels:
        accs = []
        for seed in args.seeds:
            split = splits[(k, seed)]
            tr = np.array([pos_train[int(i)] for i in split.labeled])
            te = np.array([pos_test[int(i)] for i in split.test])
            accs.append(linear_probe(feats_train[tr], dataset.train.labels[split.labeled], feats_test[te],
                                     test_pool.labels[split.test], epochs=args.probe_epochs, seed=seed))
        label = "all" if k < 0 else f"{k}/class"
        results[f"{name} | {label}"] = {"median": statistics.median(accs), "values": accs}
        rows.append({"encoder": name, "labels": label, "n_labeled": len(splits[(k, args.seeds[0])].labeled),
                     "test_acc_median": statistics.median(accs), "min": min(accs), "max": max(accs),
                     "seeds": len(accs), "encode_s": round(encode_s, 1)})
        logger.info("%s, %s: %s", name, label, accs)
    return rows, results


def main(argv: list[str] | None = None) -> dict[str, Any]:
    setup_logging()
    args = parse_args(argv)
    command = announce(argv, f"jobs.benchmarks.{NAME}")
    torch.set_num_threads(args.threads)
    out = out_dir(args.out)
    cfg = load_config(args.config, [*args.overrides, f"data.unlabeled={args.pool}", f"train.epochs={args.epochs}",
                                    f"run.output_dir={out / 'runs'}"])
    if args.encoder is None:
        encoder, budget = pretrain(cfg, out)
    else:
        encoder, budget = reuse_encoder(Path(args.encoder))
    dataset, _ = load_data(cfg)
    torch.manual_seed(cfg.seed)  # the random-init baseline starts where SimCLR started
    backbones = {
        "SimCLR (ours)": encoder,
        "random init": create_backbone(arch_spec(cfg.backbone.spec), in_chans=1).eval(),
        f"EfficientNet-Lite0 @{args.lite_size}px": create_backbone("efficientnet_lite:0", image_size=args.lite_size),
    }
    splits = probe_splits(dataset, args)
    rows: list[dict[str, Any]] = []
    results: dict[str, dict[str, Any]] = {}
    for name, backbone in backbones.items():
        encoder_rows, encoder_results = probe_encoder(name, backbone, dataset, splits, args)
        rows += encoder_rows
        results |= encoder_results
    history = [{k: (round(v, 4) if isinstance(v, float) else v) for k, v in h.items()} for h in budget["history"]]
    note = write_results(out, command, rows, title="SimCLR linear probe on Fashion-MNIST",
                         extra={"budget": budget, "results": results}, blocks=[
        f"Pretraining budget: {budget['epochs']} epochs over {budget['pool_images']} train images "
        "(used without labels) "
        f"({budget['images_seen']} images, {budget['steps']} steps of batch {budget['batch_size']}), "
        f"{budget['minutes']} minutes on a shared 2-core CPU, encoder `{budget['backbone']}`, no labels "
        f"(the online probe's labels never reach the encoder).\n",
        f"Linear probe: L2-normalised features, Adam 1e-2, {args.probe_epochs} epochs; test = "
        f"{len(splits[(args.labels[0], args.seeds[0])].test)} stratified test images; median over seeds "
        f"{args.seeds} (each seed draws its own labeled set).\n", rows, "## Pretraining epochs\n", history])
    bar_chart({k: float(v["median"]) for k, v in results.items()}, out / "linear_probe.png",
              title="Linear probe, Fashion-MNIST test accuracy (median over seeds)", ylabel="accuracy")
    print(note)
    return {"budget": budget, "rows": rows}


if __name__ == "__main__":
    main()
