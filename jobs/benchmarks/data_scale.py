"""Driver memory and throughput of listing, splitting, decoding and encoding a pool of photos.

For each pool size N, a folder of 500x375 JPEG photos (``photo_folders.py``: random crops
of scikit-image photos, a quarter EXIF-rotated, 6 corrupt files) is turned into
EfficientNet-Lite0 features, each path in a fresh Python process so that its peak RSS
(``VmHWM``) belongs to that run alone, on a local 2-CPU Ray instance:

- ``old``: main's path before Ray Data: ``load_dataset("imagefolder:<folder>")`` decodes
  every file serially in the driver and stacks the pool there, then two encoder actors
  (``num_cpus=1``) pull chunks of 250 images from the driver.
- ``new``: the job's path: ``load_split_data`` lists the folder and draws the split from
  the listing (``split.parquet`` in the run folder), then ``jobs.data.encode_pool``
  decodes the pool in Ray Data tasks and encodes it on an actor pool into the feature
  store. It is then run a second time: a cache hit, which reads the stored shards only.
- ``plain``: what a user would write by hand: ``ray.data.read_images`` of the valid
  files + ``map_batches`` with an encoder class over ``ActorPoolStrategy(size=2)`` (0.5
  CPU each, as the new path reserves, so the reads get a CPU: see ``shared/ASSETS.md``).
- ``new-s3``: ``new`` with the photos, the run folder and the feature store in a bucket
  on a SeaweedFS S3 server on loopback (``tests/s3_server.py``).

Images/s is end to end (listing, split, decode, encode; Ray start excluded). ``old`` is
run up to ``--old-max`` images (it holds the whole pool in the driver), ``plain`` and
``new-s3`` at the sizes in ``--compare-sizes``. Folders are generated once under
``--photos`` and shared with ``streaming_ingest``.

Example:
    python -m jobs.benchmarks.data_scale --sizes 5000 20000 50000 --compare-sizes 5000 --image-size 112
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from jobs.benchmarks.common import command_line, out_dir, write_results
from jobs.benchmarks.photo_folders import PHOTO_ROOT, sized_photo_folder

DEFAULT_ROOT = Path("runs/benchmarks/data_scale")
SPEC = "efficientnet_lite:0"
PATHS = ("old", "new", "plain", "new-s3")


def peak_rss_mb() -> float:
    """This process's peak resident memory (``VmHWM`` in ``/proc/self/status``) in MiB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmHWM in /proc/self/status (Linux only)")


def start_ray() -> float:
    """A local 2-CPU Ray instance; returns the seconds it took."""
    import ray

    started = time.perf_counter()
    for attempt in range(3):  # on a loaded machine the raylet can miss its 30 s registration window
        try:
            ray.init(address="local", num_cpus=2, include_dashboard=False, logging_level=logging.ERROR,
                     log_to_driver=False)
            break
        except Exception:
            ray.shutdown()
            if attempt == 2:
                raise
    return time.perf_counter() - started


def measure_old(folder: str, image_size: int) -> dict[str, Any]:
    from jobs.benchmarks.feature_store import old_actor_path
    from polyclip.data.datasets import load_dataset

    ray_start = start_ray()
    started = time.perf_counter()
    dataset = load_dataset(f"imagefolder:{folder}", image_size=image_size)
    decoded = time.perf_counter() - started
    features = old_actor_path(dataset.train.images, image_size, workers=2)
    return {"images": len(features), "skipped": len(dataset.skipped), "seconds": time.perf_counter() - started,
            "decode_s": decoded, "ray_start_s": ray_start}


def _job_config(folder: str, image_size: int, storage: str, out: str) -> Any:
    from jobs.config import parse_config

    return parse_config({
        "name": "data-scale", "seed": 0,
        "data": {"dataset": f"imagefolder:{folder}", "image_size": image_size, "labels_per_class": 10,
                 "val_per_class": 10, "test_limit": 100},
        "backbone": {"spec": SPEC, "image_size": image_size},
        "method": {"name": "probe"},
        "run": {"output_dir": out, "storage_path": storage, "encode_workers": 2},
    })


def measure_new(folder: str, image_size: int, storage: str) -> dict[str, Any]:
    """The job's path; ``storage`` (``run.storage_path``, local or ``s3://``) holds the feature store."""
    from jobs.data import encode_pool, load_split_data

    ray_start = start_ray()
    run_dir = Path(tempfile.mkdtemp(prefix="data-scale-"))  # the driver's run folder (split.parquet)
    cfg = _job_config(folder, image_size, storage, str(run_dir))
    started = time.perf_counter()
    dataset, split = load_split_data(cfg.data, cfg.seed, run_dir=run_dir)  # type: ignore[arg-type]
    listed = time.perf_counter() - started
    stats: dict[str, Any] = {}
    entry = encode_pool(cfg, dataset, split, SPEC, image_size, stats, use_gpu=False)  # type: ignore[arg-type]
    seconds = time.perf_counter() - started
    # The second identical run: a hit, reading every stored shard back (checksums checked), no pixels.
    hit_started = time.perf_counter()
    again = encode_pool(cfg, dataset, split, SPEC, image_size, stats, use_gpu=False)  # type: ignore[arg-type]
    rows = sum(len(batch["features"]) for batch in again.iter_batches())
    hit = time.perf_counter() - hit_started
    assert rows == entry.num_rows and stats[SPEC][1]["hit"], stats
    failures = stats[SPEC][0].get("decode_failures", {}).get("skipped", 0)
    return {"images": entry.num_rows, "skipped": len(getattr(dataset, "skipped", [])) + failures,
            "seconds": seconds, "list_split_s": listed, "encode_s": seconds - listed, "cache_hit_s": hit,
            "cache_hit_ratio": hit / seconds, "ray_start_s": ray_start}


class _PlainEncoder:
    """The encoder class a user would write for ``map_batches``."""

    def __init__(self, image_size: int) -> None:
        import torch

        from polyclip.backbones import create_backbone

        torch.set_num_threads(1)
        self.backbone = create_backbone(SPEC, image_size=image_size).eval()

    def __call__(self, batch: dict[str, Any]) -> dict[str, Any]:
        import torch

        images = torch.from_numpy(batch["image"]).permute(0, 3, 1, 2).contiguous()  # read_images gives NHWC
        with torch.inference_mode():
            return {"features": self.backbone.encode(images).numpy()}


def measure_plain(folder: str, image_size: int) -> dict[str, Any]:
    import ray
    import ray.data

    ray_start = start_ray()
    started = time.perf_counter()
    paths = sorted(str(p) for p in Path(folder).rglob("*.jpg") if not p.name.startswith("bad_"))
    ds = ray.data.read_images(paths, size=(image_size, image_size), mode="RGB")
    encoded = ds.map_batches(_PlainEncoder, fn_constructor_args=(image_size,), batch_size=128, batch_format="numpy",
                             compute=ray.data.ActorPoolStrategy(size=2), num_cpus=0.5)
    images = sum(len(batch["features"]) for batch in encoded.iter_batches(batch_size=None, batch_format="numpy"))
    return {"images": images, "skipped": 0, "seconds": time.perf_counter() - started, "ray_start_s": ray_start}


def _measure(args: argparse.Namespace) -> None:
    if args.measure == "old":
        result = measure_old(args.folder, args.image_size)
    elif args.measure in ("new", "new-s3"):
        result = measure_new(args.folder, args.image_size, args.out)
    else:
        result = measure_plain(args.folder, args.image_size)
    result |= {"path": args.measure, "images_per_s": result["images"] / result["seconds"],
               "driver_peak_rss_mb": peak_rss_mb()}
    print("RESULT " + json.dumps(result), flush=True)


def run_one(path: str, folder: str, image_size: int, out: str, timeout_s: float,
            env: dict[str, str] | None = None) -> dict[str, Any]:
    """Measure one path on one folder in a fresh interpreter."""
    command = [sys.executable, "-m", "jobs.benchmarks.data_scale", "--measure", path, "--folder", folder,
               "--image-size", str(image_size), "--out", out]
    full_env = os.environ | {"RAY_USAGE_STATS_ENABLED": "0", "RAY_AUTH_MODE": "disabled"} | (env or {})
    done = subprocess.run(command, capture_output=True, text=True, timeout=timeout_s, env=full_env, check=False)
    for line in done.stdout.splitlines():
        if line.startswith("RESULT "):
            return dict(json.loads(line[len("RESULT "):]))
    raise RuntimeError(f"{path} on {folder} failed ({done.returncode}):\n{done.stderr[-3000:]}")


class _Bucket:
    """The loopback S3 server with each compared folder uploaded once (started only if ``new-s3`` runs)."""

    def __init__(self, work: Path) -> None:
        self.work, self.server, self.uploaded = work, None, {}

    def prefix(self, folder: Path) -> tuple[str, dict[str, str]]:
        sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
        from tests.s3_fixtures import upload_folder
        from tests.s3_server import S3Server

        if self.server is None:
            self.server = S3Server.start(self.work / "seaweedfs")
        if folder not in self.uploaded:
            started = time.perf_counter()
            count = upload_folder(self.server, folder, f"bench/{folder.name}")
            print(f"uploaded {count} files in {time.perf_counter() - started:.0f} s", file=sys.stderr)
            self.uploaded[folder] = f"s3://bench/{folder.name}"
        return self.uploaded[folder], self.server.env()

    def stop(self) -> None:
        if self.server is not None:
            self.server.stop()


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[5000, 20000, 50000])
    parser.add_argument("--compare-sizes", type=int, nargs="+", default=[5000],
                        help="sizes at which plain and new-s3 also run")
    parser.add_argument("--old-max", type=int, default=20000, help="largest size the old path runs at")
    parser.add_argument("--image-size", type=int, default=112)
    parser.add_argument("--paths", nargs="+", default=list(PATHS), choices=PATHS)
    parser.add_argument("--root", default=str(DEFAULT_ROOT), help="where results.json goes")
    parser.add_argument("--photos", default=str(PHOTO_ROOT), help="photo folders, generated once and shared")
    parser.add_argument("--timeout-s", type=float, default=3600)
    parser.add_argument("--measure", choices=PATHS, help=argparse.SUPPRESS)
    parser.add_argument("--folder", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def run_all(args: argparse.Namespace, root: Path) -> list[dict[str, Any]]:
    """Every (size, path) the flags ask for, each in a fresh process; the S3 server only if ``new-s3`` runs."""
    largest = max(args.sizes)
    results: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(dir=root) as work:
        bucket = _Bucket(Path(work))
        try:
            for n in sorted(args.sizes):
                folder = sized_photo_folder(Path(args.photos), n, largest).resolve()
                for path in args.paths:
                    if (path == "old" and n > args.old_max) or (path in ("plain", "new-s3")
                                                                and n not in args.compare_sizes):
                        continue
                    out, env, source = str(Path(work) / f"{path}-{n}"), None, str(folder)
                    if path == "new-s3":
                        source, env = bucket.prefix(folder)
                        out = f"s3://bench/runs-{n}"
                    result = run_one(path, source, args.image_size, out, args.timeout_s, env) | {"n": n}
                    print(json.dumps(result), file=sys.stderr, flush=True)
                    results.append(result)
        finally:
            bucket.stop()
    return results


def table(results: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per run, with images/s as a ratio to ``plain`` and ``old`` at the same size."""
    rows = []
    for r in results:
        same_n = {o["path"]: o for o in results if o["n"] == r["n"]}
        ratio = {k: (f"{r['images_per_s'] / same_n[k]['images_per_s']:.2f}x" if k in same_n else "")
                 for k in ("plain", "old")}
        rows.append({"N": r["n"], "path": r["path"], "driver peak RSS (MiB)": round(r["driver_peak_rss_mb"]),
                     "images": r["images"], "skipped": r["skipped"], "seconds": round(r["seconds"], 1),
                     "images/s": round(r["images_per_s"], 1), "vs plain": ratio["plain"], "vs old": ratio["old"],
                     "cache hit / miss": f"{r['cache_hit_ratio']:.3f}" if "cache_hit_ratio" in r else ""})
    return rows


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    args = parse_args(argv)
    if args.measure:
        _measure(args)
        return []
    root = out_dir(args.root)
    command = command_line(argv, "jobs.benchmarks.data_scale")
    results = run_all(args, root)
    new = {r["n"]: r["driver_peak_rss_mb"] for r in results if r["path"] == "new"}
    blocks: list[Any] = [f"EfficientNet-Lite0 at {args.image_size} px, 2-CPU local Ray, load average "
                         f"{os.getloadavg()[0]:.1f} at the end\n", table(results)]
    if len(new) > 1:
        blocks.append(f"\nnew path driver RSS, largest / smallest N: {new[max(new)] / new[min(new)]:.2f}\n")
    print(write_results(root, command, results, title="Data at cluster scale: list, split, decode, encode",
                        blocks=blocks, floatfmt=".2f"))
    return results


if __name__ == "__main__":
    main()
