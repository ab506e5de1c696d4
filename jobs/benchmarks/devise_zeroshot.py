"""DeViSE zero-shot on Fashion-MNIST: 7 seen classes train, 3 unseen are only tested.

Frozen EfficientNet-Lite0 features (112 px, cached), GloVe 6B 50d label vectors. For
each seed the 3 unseen classes are drawn with that seed (``polyclip.metrics.zero_shot.choose_unseen``,
as the ``devise`` recipe does), the labeled images of the 7 seen classes train the map,
and the full 10k test set is scored over all 10 classes.

Settings are chosen per seed **without looking at the unseen classes**: among that
seed's 7 seen classes, folds of 2 *pseudo-unseen* classes are held out, a map is trained
on the other 5, and each candidate setting is scored by its accuracy among the 2
pseudo-unseen classes on their train-pool images (never trained on in that fold). The best setting
is then retrained on all 7 seen classes and evaluated once on the test set. The grid:
loss (hinge rank with all negatives / ``1 - cos``), feature standardisation, label words
(full label vs head word), and ``--labels`` per seen class (default 200 only: CPU budget). A closed-form ridge map
(features -> GloVe, the reference point of ASSETS.md) is measured on the same splits.

Usage::

    python -m jobs.benchmarks.devise_zeroshot [--seeds 0 1 2] [--image-size 112] [--epochs 200]

CPU is shared with other jobs: the per-fit budget is a few hundred full-batch Adam
steps on cached features; the first run encodes 16k images (the 10k test set and a
5k train pool) once into ``.cache/features``.
"""

from __future__ import annotations

import argparse
import itertools
import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from sklearn.linear_model import Ridge

from jobs.benchmarks.common import announce, lite0_pool, out_dir, summary, write_results
from jobs.runtime import setup_logging
from polyclip.data.datasets import load_dataset
from polyclip.engine.fit import fit_arrays
from polyclip.features.cache import FeatureCache
from polyclip.methods.devise import DeViSETask
from polyclip.metrics.zero_shot import choose_unseen, zero_shot_report
from polyclip.reports.plots import bar_chart
from polyclip.text import DEFAULT_WORD_VECTORS, label_similarity_matrix, label_vectors, load_word_vectors

GRID: dict[str, list[Any]] = {"loss": ["hinge", "cosine"], "standardize": [True, False], "head_word": [False, True],
                              "labels_per_class": [200]}


def fit_devise(x: np.ndarray, y: np.ndarray, vectors: np.ndarray, *, loss: str, epochs: int, seed: int,
               lr: float = 0.01) -> DeViSETask:
    """polyclip's DeViSE task on cached features, full batch, by the generic loop."""
    torch.manual_seed(seed)
    task = DeViSETask(None, x.shape[1], vectors, loss=loss, margin=0.1, negatives="all", seed=seed)
    fit_arrays(task, {"x": x, "y": y}, epochs=epochs, optimizer="adam", lr=lr, weight_decay=1e-4,
               scheduler="constant", seed=seed)
    return task.eval()


def scores_over(task: DeViSETask, x: np.ndarray, vectors: np.ndarray) -> np.ndarray:
    """Cosine scores of ``x`` against ``vectors`` (any class list)."""
    with torch.no_grad():
        emb = torch.nn.functional.normalize(task.embed(torch.from_numpy(x)), dim=1)
        return (emb @ torch.nn.functional.normalize(torch.from_numpy(vectors), dim=1).T).numpy()


def ridge_scores(x: np.ndarray, y: np.ndarray, vectors: np.ndarray, seen: list[int], x_test: np.ndarray) -> np.ndarray:
    """The ASSETS.md reference: a ridge map from features to the label vector, cosine look-up."""
    targets = vectors[seen][np.searchsorted(seen, y)]
    pred = Ridge(alpha=1.0).fit(x, targets).predict(x_test)
    pred /= np.linalg.norm(pred, axis=1, keepdims=True) + 1e-12
    unit = vectors / np.linalg.norm(vectors, axis=1, keepdims=True)
    return pred @ unit.T


def standardizer(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    return x.mean(axis=0), x.std(axis=0) + 1e-6


def pick(labels: np.ndarray, classes: list[int], per_class: int, rng: np.random.Generator) -> np.ndarray:
    """Positions of ``per_class`` random examples of each class in ``classes``."""
    return np.concatenate([rng.permutation(np.flatnonzero(labels == c))[:per_class] for c in classes])


@dataclass
class Pool:
    """Cached features and labels of the labeled train pool and the test set, with the label vectors."""

    names: list[str]
    x_lab: np.ndarray
    y_lab: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    vectors: dict[bool, np.ndarray]  # head_word -> (classes, dim)
    similarity: np.ndarray
    epochs: int


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--image-size", type=int, default=112)
    parser.add_argument("--epochs", type=int, default=100)
    parser.add_argument("--folds", type=int, default=2, help="pseudo-unseen folds per seed")
    parser.add_argument("--labels", type=int, nargs="+", default=[200], help="labels per seen class to try")
    parser.add_argument("--cache-dir", default=".cache/features")
    parser.add_argument("--workers", type=int, default=2)
    return parser.parse_args(argv)


def load_pool(args: argparse.Namespace) -> tuple[Pool, float]:
    """The features (encoded once into the cache) and label vectors; and the seconds they took."""
    dataset = load_dataset("fashion_mnist")
    names = list(dataset.class_names)
    assert dataset.test is not None
    t0 = time.perf_counter()
    x_lab, y_lab, x_test, y_test = lite0_pool(dataset, FeatureCache(args.cache_dir), args.image_size,
                                              workers=args.workers)
    encode_s = time.perf_counter() - t0
    kv = load_word_vectors(DEFAULT_WORD_VECTORS)
    vectors = {hw: label_vectors(names, kv, head_word=hw) for hw in (False, True)}
    # Semantic similarity is always measured with the full-label vectors, so settings compare alike.
    similarity = label_similarity_matrix(vectors[False]).numpy()
    return Pool(names, x_lab, y_lab, x_test, y_test, vectors, similarity, args.epochs), encode_s


def train_setting(pool: Pool, setting: dict[str, Any], train_classes: list[int], xs: list[np.ndarray], seed: int
                  ) -> tuple[DeViSETask, list[np.ndarray]]:
    """Train on ``train_classes`` (labeled pool), return the task and the transformed eval sets."""
    rng = np.random.default_rng(seed)
    rows = pick(pool.y_lab, train_classes, setting["labels_per_class"], rng)
    x, y = pool.x_lab[rows], pool.y_lab[rows]
    if setting["standardize"]:
        mean, std = standardizer(x)
        x, xs = (x - mean) / std, [(e - mean) / std for e in xs]
    v = pool.vectors[setting["head_word"]]
    position = {c: i for i, c in enumerate(train_classes)}
    task = fit_devise(x.astype(np.float32), np.array([position[c] for c in y]), v[train_classes],
                      loss=setting["loss"], epochs=pool.epochs, seed=seed)
    return task, [e.astype(np.float32) for e in xs]


def pseudo_unseen_accuracy(pool: Pool, setting: dict[str, Any], seen: list[int], folds: list[list[int]],
                           seed: int) -> float:
    """Mean accuracy among each fold's 2 pseudo-unseen classes, the map trained on the other seen classes."""
    accs = []
    for pseudo in folds:
        train_classes = [c for c in seen if c not in pseudo]
        # The pseudo-unseen classes' pool images: never trained on in this fold.
        rows = np.isin(pool.y_lab, pseudo)
        task, (xv,) = train_setting(pool, setting, train_classes, [pool.x_lab[rows]], seed)
        s = scores_over(task, xv, pool.vectors[setting["head_word"]][pseudo])
        accs.append(float((np.asarray(pseudo)[s.argmax(1)] == pool.y_lab[rows]).mean()))
    return float(np.mean(accs))


def evaluate_seed(pool: Pool, seed: int, settings: list[dict[str, Any]], args: argparse.Namespace
                  ) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """One seed: its unseen classes, the setting chosen on pseudo-unseen folds, the test reports of
    the chosen setting, the default setting and the ridge map; and the selection rows."""
    names = pool.names
    unseen = choose_unseen(names, None, 3, seed)
    seen = [c for c in range(len(names)) if c not in unseen]
    rng = np.random.default_rng(1000 + seed)
    folds = [sorted(rng.choice(seen, 2, replace=False).tolist()) for _ in range(args.folds)]
    val_scores = [pseudo_unseen_accuracy(pool, setting, seen, folds, seed) for setting in settings]
    selection_rows = [{"seed": seed, **setting, "pseudo_unseen_val_acc": round(score, 4)}
                      for setting, score in zip(settings, val_scores)]
    best = settings[int(np.argmax(val_scores))]

    def report_of(scores: np.ndarray) -> dict[str, Any]:
        return zero_shot_report(scores, pool.y_test, names, unseen, similarity=pool.similarity, seed=seed)

    t_fit = time.perf_counter()
    task, (xt,) = train_setting(pool, best, seen, [pool.x_test], seed)
    fit_s = time.perf_counter() - t_fit
    report = report_of(scores_over(task, xt, pool.vectors[best["head_word"]]))
    # Baselines on the same split: the default setting (hinge, raw features, full label)
    # and the ridge map of ASSETS.md.
    default = {"loss": "hinge", "standardize": False, "labels_per_class": args.labels[0], "head_word": False}
    dtask, (xd,) = train_setting(pool, default, seen, [pool.x_test], seed)
    default_report = report_of(scores_over(dtask, xd, pool.vectors[False]))
    rows = pick(pool.y_lab, seen, best["labels_per_class"], np.random.default_rng(seed))
    ridge_report = report_of(ridge_scores(pool.x_lab[rows], pool.y_lab[rows], pool.vectors[False], seen,
                                          pool.x_test))
    print(f"seed {seed}: unseen {report['unseen_classes']}, chosen {best}: unseen acc "
          f"{report['unseen_top1']:.3f} (default {default_report['unseen_top1']:.3f}, ridge "
          f"{ridge_report['unseen_top1']:.3f})", flush=True)
    return {"seed": seed, "unseen": report["unseen_classes"], "chosen": best, "chosen_val_acc": max(val_scores),
            "fit_seconds": round(fit_s, 2), "devise": report, "devise_default": default_report,
            "ridge": ridge_report}, selection_rows


METRICS: dict[str, Any] = {
    "unseen_top1": lambda r: r["unseen_top1"], "generalised_top1": lambda r: r["generalised_top1"],
    "generalised_harmonic": lambda r: r["generalised_harmonic"], "seen_top1": lambda r: r["seen_top1"],
    "hit@1": lambda r: r["hit"]["hit@1"], "hit@5": lambda r: r["hit"]["hit@5"],
    "top3_similarity": lambda r: r["semantic"]["top3_similarity"],
    "control_similarity": lambda r: r["semantic"]["control_similarity"],
}


def table_row(per_seed: list[dict[str, Any]], label: str, key: str) -> dict[str, Any]:
    """Median over seeds (per-seed values) of every metric of model ``key``."""
    reps = [s[key] for s in per_seed]
    out_row: dict[str, Any] = {"model": label}
    for name, fn in METRICS.items():
        s = summary([fn(r) for r in reps])
        out_row[name] = f"{s['median']:.3f} ({', '.join(f'{v:.3f}' for v in s['values'])})"
    return out_row


def write_report(out: Path, command: str, args: argparse.Namespace, pool: Pool, per_seed: list[dict[str, Any]],
                 selection_rows: list[dict[str, Any]], encode_s: float) -> tuple[dict[str, Any], str]:
    """``results.{json,md}`` and ``unseen_accuracy.png``; returns the report and its markdown."""
    table = [table_row(per_seed, "DeViSE, chosen on pseudo-unseen", "devise"),
             table_row(per_seed, "DeViSE, default setting", "devise_default"),
             table_row(per_seed, "ridge map (ASSETS.md reference)", "ridge")]
    med = {k: float(np.median([s[k]["unseen_top1"] for s in per_seed])) for k in ("devise", "devise_default", "ridge")}
    extra = {"seeds": args.seeds, "epochs": args.epochs, "folds": args.folds, "encode_seconds": round(encode_s, 1),
             "test_images": len(pool.y_test), "per_seed": per_seed, "median_unseen_top1": med,
             "ratio_devise_over_ridge": med["devise"] / med["ridge"], "selection": selection_rows}
    bar_chart({k: v for k, v in med.items()}, out / "unseen_accuracy.png",
              "Fashion-MNIST unseen-class accuracy (3 classes, chance 0.333), median of seeds", "accuracy")
    per_seed_rows = [{"seed": s["seed"], "unseen classes": ", ".join(s["unseen"]),
                      "chosen setting": json.dumps(s["chosen"]), "pseudo-unseen val acc": round(s["chosen_val_acc"], 3),
                      "unseen_top1": round(s["devise"]["unseen_top1"], 3),
                      "ridge unseen_top1": round(s["ridge"]["unseen_top1"], 3)} for s in per_seed]
    md = write_results(out, command, table, title="DeViSE zero-shot, Fashion-MNIST 7 seen / 3 unseen", extra=extra,
                       blocks=[
        f"Frozen efficientnet_lite:0 features at {args.image_size} px, GloVe 6B 50d, full {len(pool.y_test)}-image "
        f"test set, seeds {args.seeds} (each seed draws its own unseen classes). Cells: median over seeds "
        "(per-seed values). unseen_top1 is among the 3 unseen classes (chance 0.333); generalised_top1 over all "
        "10 classes on all test images; hit@k over the 10 classes; top3_similarity is the mean GloVe cosine of "
        "the top-3 predictions to the true label, control_similarity that of random label pairs.\n", table,
        f"Median unseen accuracy: DeViSE {med['devise']:.3f}, ridge {med['ridge']:.3f} "
        f"(ratio {extra['ratio_devise_over_ridge']:.2f}).\n\n## Per seed\n", per_seed_rows,
        "## Setting selection (pseudo-unseen seen classes only; the test set was not used)\n", selection_rows,
        "![unseen accuracy](unseen_accuracy.png)\n"])
    return {"command": command, "rows": table, **extra}, md


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    command = announce(argv, "jobs.benchmarks.devise_zeroshot")
    setup_logging()
    torch.set_num_threads(1)  # the CPU is shared; one thread per fit
    out = out_dir("devise_zeroshot")
    pool, encode_s = load_pool(args)
    grid = {**GRID, "labels_per_class": args.labels}
    settings = [dict(zip(grid, values)) for values in itertools.product(*grid.values())]
    per_seed, selection_rows = [], []
    for seed in args.seeds:
        result, selection = evaluate_seed(pool, seed, settings, args)
        per_seed.append(result)
        selection_rows += selection
    report, md = write_report(out, command, args, pool, per_seed, selection_rows, encode_s)
    print(md)
    return report


if __name__ == "__main__":
    main()
