"""Distilled student vs teacher + classifier: test accuracy and per-image inference cost.

Usage::

    python -m jobs.benchmarks.distill_cost [--epochs 10] [--probe-epochs 60] [--labels-per-class 100]
        [--test-limit 2000] [--repeats 30]

Both models come from the shipped configs (``jobs/configs/language/distill.yaml`` and
``teacher_classifier.yaml``) through their recipes' ``build_task``, trained in one
process by the generic loop (no Ray, to keep the budget affordable on a shared 2-core
machine): the student is a small CNN + linear layer to EfficientNet-Lite0's 1280-d
embedding + a 4-layer MLP, trained with cosine + cross-entropy; "teacher + classifier"
is the same 4-layer MLP on frozen EfficientNet-Lite0 embeddings at 112 px. Teacher
embeddings come from the shared feature store (the entries of the Ray job).

Inference cost is measured from raw ``uint8`` 28x28 images to logits, so the teacher's
cost includes resizing to 112 px and the EfficientNet-Lite0 forward pass. Student and
teacher batches alternate (side by side); reported are medians over repeats, per image,
at batch 1 and batch 64, with one torch thread.

Figures: ``runs/benchmarks/distill_cost/`` (``distill_cost.md``, ``.json``, ``.png``).
"""

from __future__ import annotations

import argparse
import time
from typing import Any

import numpy as np
import torch

from jobs.benchmarks.common import announce, median, out_dir, pool_features, write_results
from jobs.config import load_config
from jobs.data import load_data
from jobs.recipes import RECIPES, PrepareContext
from polyclip.backbones import create_backbone
from polyclip.engine import evaluate
from polyclip.engine.fit import fit_arrays
from polyclip.features.cache import FeatureCache
from polyclip.reports.plots import bar_chart

CONFIGS = {"student": "jobs/configs/language/distill.yaml", "teacher": "jobs/configs/language/teacher_classifier.yaml"}


def local_features(cache: FeatureCache, dataset: Any, split: Any, spec: str, image_size: int | None,
                   subset: str) -> np.ndarray:
    """Cached features of a subset, encoded in this process on a miss (the feature store entry of the Ray job)."""
    pool = "test" if subset == "test" and split.test_from == "test" else "train"
    return pool_features(cache, dataset, spec, image_size, pool, getattr(split, subset), use_ray=False)


def fit(task: torch.nn.Module, arrays: dict[str, np.ndarray], cfg: Any, epochs: int, batch_size: int) -> float:
    """Train with the generic loop (cfg's optimiser and schedule); return seconds."""
    tic = time.perf_counter()
    fit_arrays(task, arrays, epochs=epochs, batch_size=batch_size, optimizer=cfg.train.optimizer, lr=cfg.train.lr,
               weight_decay=cfg.train.weight_decay, scheduler=cfg.train.scheduler, seed=cfg.seed)
    return time.perf_counter() - tic


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--epochs", type=int, default=10, help="student epochs")
    parser.add_argument("--probe-epochs", type=int, default=60, help="teacher + classifier epochs (cheap)")
    parser.add_argument("--labels-per-class", type=int, default=100)
    parser.add_argument("--test-limit", type=int, default=2000)
    parser.add_argument("--val-per-class", type=int, default=50)
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--cache-dir", default=".cache/features")
    return parser.parse_args(argv)


def train_both(cfgs: dict[str, Any], dataset: Any, split: Any, cache: FeatureCache,
               args: argparse.Namespace) -> dict[str, Any]:
    """Student and teacher + classifier, each built by its recipe and trained; test accuracy and seconds."""

    def features(spec: str, size: int | None, subset: str) -> np.ndarray:
        return local_features(cache, dataset, split, spec, size, subset)

    results: dict[str, Any] = {}
    for name, cfg in cfgs.items():
        ctx = PrepareContext(cfg=cfg, dataset=dataset, split=split, features=features)
        recipe = RECIPES[cfg.method.name]
        payload = recipe.prepare(ctx, cfg.method)
        task = recipe.build_task(cfg, cfg.method, payload)
        epochs = args.epochs if name == "student" else args.probe_epochs
        seconds = fit(task, payload.train, cfg, epochs, cfg.train.batch_size * cfg.scaling.num_workers)
        task.eval()
        predict: Any = task.predict
        logits = evaluate(predict, payload.test["x"], device=torch.device("cpu"))
        results[name] = {"task": task, "test_acc": float((logits.argmax(1) == payload.test["y"]).mean()),
                         "train_seconds": seconds, "epochs": epochs}
        print(f"{name}: test acc {results[name]['test_acc']:.4f} ({seconds:.0f} s)", flush=True)
    return results


def inference_cost(student: Any, probe: Any, teacher: Any, images: np.ndarray, repeats: int
                   ) -> dict[str, dict[int, float]]:
    """Median seconds per image from raw images to logits, batches 1 and 64, the two models interleaved."""

    @torch.no_grad()
    def student_infer(x: torch.Tensor) -> torch.Tensor:
        return student.predict(x)

    @torch.no_grad()
    def teacher_infer(x: torch.Tensor) -> torch.Tensor:
        return probe.predict(teacher.encode(x))

    cost: dict[str, dict[int, float]] = {"student": {}, "teacher": {}}
    for batch in (1, 64):
        x = torch.as_tensor(images[:batch])
        times: dict[str, list[float]] = {"student": [], "teacher": []}
        for i in range(repeats + 3):
            for name, fn in (("student", student_infer), ("teacher", teacher_infer))[:: 1 if i % 2 else -1]:
                tic = time.perf_counter()
                fn(x)
                if i >= 3:
                    times[name].append((time.perf_counter() - tic) / batch)
        for name in cost:
            cost[name][batch] = median(times[name])
    return cost


def params(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def write_report(command: str, args: argparse.Namespace, results: dict[str, Any], teacher: torch.nn.Module,
                 teacher_size: int, cost: dict[str, dict[int, float]], split: Any) -> tuple[dict[str, Any], str]:
    """``distill_cost.{json,md,png}``; returns the report and its markdown."""
    student, probe = results["student"]["task"], results["teacher"]["task"]
    rows = [
        {"model": "distilled student (small CNN + linear + 4-layer MLP)", "test_acc": results["student"]["test_acc"],
         "ms_per_image_b1": 1e3 * cost["student"][1], "ms_per_image_b64": 1e3 * cost["student"][64],
         "params": params(student), "input": "28x28", "train_epochs": results["student"]["epochs"]},
        {"model": "teacher + classifier (EfficientNet-Lite0 @112 + 4-layer MLP)",
         "test_acc": results["teacher"]["test_acc"], "ms_per_image_b1": 1e3 * cost["teacher"][1],
         "ms_per_image_b64": 1e3 * cost["teacher"][64], "params": params(teacher) + params(probe),
         "input": f"{teacher_size}x{teacher_size}", "train_epochs": results["teacher"]["epochs"]},
    ]
    speedup = {b: cost["teacher"][b] / cost["student"][b] for b in (1, 64)}
    extra = {"args": vars(args), "teacher_over_student_cost": speedup, "n_train": len(split.labeled),
             "n_test": len(split.test)}
    folder = out_dir("distill_cost")
    bar_chart({"student": 1e3 * cost["student"][64], "teacher + classifier": 1e3 * cost["teacher"][64]},
              folder / "distill_cost.png", title="Inference cost per image (batch 64, 1 thread)", ylabel="ms / image")
    md = write_results(folder, command, rows, title="Distilled student vs teacher + classifier", extra=extra,
                       stem="distill_cost", floatfmt=".4f", blocks=[
        f"Fashion-MNIST, {args.labels_per_class} labels per class ({len(split.labeled)} images), "
        f"test set of {len(split.test)} images, seed 0, one run (no repeats over seeds). Inference: raw "
        f"uint8 images to logits, 1 torch thread, median of {args.repeats} interleaved repeats. The CPU is "
        "shared with other jobs, so absolute times are noisy; the ratio is measured side by side.\n", rows,
        f"Teacher + classifier / student cost per image: {speedup[1]:.1f}x at batch 1, "
        f"{speedup[64]:.1f}x at batch 64.\n\n![cost](distill_cost.png)\n"])
    return {"command": command, "rows": rows, **extra}, md


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    command = announce(argv, "jobs.benchmarks.distill_cost")
    torch.set_num_threads(1)
    torch.manual_seed(0)
    overrides = [f"data.labels_per_class={args.labels_per_class}", f"data.test_limit={args.test_limit}",
                 f"data.val_per_class={args.val_per_class}"]
    cfgs = {k: load_config(v, overrides) for k, v in CONFIGS.items()}
    s_cfg, t_cfg = cfgs["student"], cfgs["teacher"]
    dataset, split = load_data(s_cfg)
    teacher_spec, teacher_size = s_cfg.method.teacher, s_cfg.method.teacher_image_size
    assert (teacher_spec, teacher_size) == (t_cfg.backbone.spec, t_cfg.backbone.image_size), "configs disagree"
    results = train_both(cfgs, dataset, split, FeatureCache(args.cache_dir), args)
    teacher = create_backbone(teacher_spec, image_size=teacher_size).eval()
    images = dataset.test.images[split.test]  # type: ignore[union-attr]
    cost = inference_cost(results["student"]["task"], results["teacher"]["task"], teacher, images, args.repeats)
    report, md = write_report(command, args, results, teacher, teacher_size, cost, split)
    print(md)
    return report


if __name__ == "__main__":
    main()
