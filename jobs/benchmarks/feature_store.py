"""Feature store: Ray Data encoding vs the old actor path, and cache hit vs miss.

On real Fashion-MNIST train images with the packaged EfficientNet-Lite0, medians over
``--repeats`` runs on a local Ray cluster:

- **old actor path**: main's encoding before the store (``ray.remote(num_cpus=1)`` actors,
  chunks of 250 images sent by the driver, the result concatenated on the driver);
- **Ray Data path**: ``jobs.features.encode_dataset`` (``map_batches`` over an actor pool
  with fractional CPUs, shards written as they arrive) into a fresh store entry;
- **cache**: ``cached_features`` once on a miss, then hits that read the shards back.

Usage::

    python -m jobs.benchmarks.feature_store [--images 2000] [--image-size 112] [--repeats 3] [--workers 2]
        [--parts encode cache]

Writes ``runs/benchmarks/feature_store/results.{json,md}``.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from jobs.benchmarks.common import announce, median, out_dir, write_results
from jobs.runtime import init_ray, setup_logging
from polyclip.data.datasets import load_dataset
from polyclip.features import FeatureCache, FeatureStore

SPEC = "efficientnet_lite:0"


class _OldEncoder:
    """main's encoder actor before the store: one backbone, one thread, chunks in, features out."""

    def __init__(self, spec: str, image_size: int | None) -> None:
        import torch

        from polyclip.backbones import create_backbone

        torch.set_num_threads(1)
        torch.manual_seed(0)
        self.backbone = create_backbone(spec, image_size=image_size)

    def encode(self, images: np.ndarray) -> np.ndarray:
        from polyclip.features import encode_images

        return encode_images(self.backbone, images, batch_size=100)


def old_actor_path(images: np.ndarray, image_size: int, workers: int, chunk: int = 250) -> np.ndarray:
    """The pre-store ``cached_features`` miss: actors pulled chunk by chunk from the driver."""
    import ray

    actor_cls: Any = ray.remote(num_cpus=1, max_restarts=3, max_task_retries=3)(_OldEncoder)
    actors = [actor_cls.remote(SPEC, image_size) for _ in range(workers)]
    starts = list(range(0, len(images), chunk))
    queue = list(starts)
    results: dict[int, np.ndarray] = {}
    pending: dict[Any, tuple[int, Any]] = {}
    try:
        for actor in actors:
            if queue:
                s = queue.pop(0)
                pending[actor.encode.remote(images[s : s + chunk])] = (s, actor)
        while pending:
            (ref,), _ = ray.wait(list(pending), num_returns=1)
            s, actor = pending.pop(ref)
            results[s] = ray.get(ref)
            if queue:
                nxt = queue.pop(0)
                pending[actor.encode.remote(images[nxt : nxt + chunk])] = (nxt, actor)
    finally:
        for actor in actors:
            ray.kill(actor)
    return np.concatenate([results[s] for s in starts])


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=2000)
    parser.add_argument("--image-size", type=int, default=112)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=100)
    parser.add_argument("--store", default=None, help="store root (default: a temporary folder)")
    parser.add_argument("--parts", nargs="+", choices=["encode", "cache"], default=["encode", "cache"],
                        help="measure encoding throughput, cache hit vs miss, or both")
    return parser.parse_args(argv)


def time_encoding(images: np.ndarray, root: Path, args: argparse.Namespace
                  ) -> tuple[dict[str, list[float]], float]:
    """Seconds of the old actor path and of the Ray Data path per repeat; their largest feature difference."""
    from jobs.features import encode_dataset, images_dataset

    timings: dict[str, list[float]] = {"old_actor_path": [], "ray_data_path": []}
    reference, max_diff = None, float("nan")
    for repeat in range(args.repeats):
        t0 = time.perf_counter()
        old = old_actor_path(images, args.image_size, args.workers)
        timings["old_actor_path"].append(time.perf_counter() - t0)
        reference = old if reference is None else reference

        store = FeatureStore(root / f"encode-{repeat}")
        t0 = time.perf_counter()
        entry = encode_dataset(images_dataset(images), SPEC, args.image_size, store, "bench", use_gpu=False,
                               batch_size=args.batch_size, concurrency=args.workers, num_rows=len(images))
        timings["ray_data_path"].append(time.perf_counter() - t0)
        max_diff = float(np.abs(entry.to_numpy() - reference).max())
        print(f"repeat {repeat}: old actor path {timings['old_actor_path'][-1]:.1f} s, "
              f"Ray Data path {timings['ray_data_path'][-1]:.1f} s for {len(images)} images", flush=True)
    return timings, max_diff


def time_cache(dataset: Any, images: np.ndarray, root: Path, args: argparse.Namespace) -> tuple[float, list[float]]:
    """``cached_features`` once on a miss, then ``--repeats`` hits: the miss's and the hits' seconds."""
    from jobs.features import cached_features

    stats: dict[str, Any] = {SPEC: [{"seconds": float("nan")}]}
    cache = FeatureCache(root / "cache")
    indices = np.arange(len(images))
    for _ in range(1 + args.repeats):  # one miss, then hits
        cached_features(cache, SPEC, args.image_size, dataset.fingerprint, dataset.spec, "train", indices, images,
                        num_workers=args.workers, stats=stats)
    calls = stats[SPEC][-(1 + args.repeats):]
    return calls[0]["seconds"], [c["seconds"] for c in calls[1:]]


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    command = announce(argv, "jobs.benchmarks.feature_store")
    setup_logging()
    init_ray()
    dataset = load_dataset("fashion_mnist")
    images = np.ascontiguousarray(dataset.train.images[: args.images])
    n = len(images)
    root = Path(args.store) if args.store else Path(tempfile.mkdtemp(prefix="feature_store_bench_"))
    timings: dict[str, list[float]] = {"old_actor_path": [], "ray_data_path": [], "cache_hit": []}
    max_diff, miss_s = float("nan"), float("nan")
    if "encode" in args.parts:
        encoded, max_diff = time_encoding(images, root, args)
        timings.update(encoded)
    if "cache" in args.parts:
        miss_s, timings["cache_hit"] = time_cache(dataset, images, root, args)
    old_s, new_s, hit_s = (median(timings[k] or [float("nan")]) for k in ("old_actor_path", "ray_data_path",
                                                                          "cache_hit"))
    results = {
        "backbone": SPEC, "image_size": args.image_size, "images": n,
        "workers": args.workers, "repeats": args.repeats,
        "old_actor_path_images_per_s": round(n / old_s, 1), "ray_data_path_images_per_s": round(n / new_s, 1),
        "ray_data_vs_old": round(old_s / new_s, 3),
        "cache_miss_s": miss_s, "cache_hit_s": round(hit_s, 3), "hit_over_miss": round(hit_s / miss_s, 4),
        "max_abs_diff_vs_old_path": max_diff, "seconds": {k: [round(v, 3) for v in vs] for k, vs in timings.items()},
    }
    rows = [{"path": "old actor path (encode)", "median_s": old_s,
             "images_per_s": results["old_actor_path_images_per_s"]},
            {"path": "Ray Data into the store (encode)", "median_s": new_s,
             "images_per_s": results["ray_data_path_images_per_s"]},
            {"path": "cache miss", "median_s": miss_s, "images_per_s": round(n / miss_s, 1)},
            {"path": "cache hit", "median_s": hit_s, "images_per_s": round(n / hit_s, 1)}]
    write_results(out_dir("feature_store"), command, rows, title=f"Feature store: {n} images, {SPEC}", extra=results)
    print(json.dumps(results, indent=2))
    return {"command": command, "rows": rows, **results}


if __name__ == "__main__":
    main()
