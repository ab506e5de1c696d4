"""Driver memory and throughput of image ingest: Ray Data decode tasks vs the in-driver path.

For each pool size N, photo folders of 500x375 JPEGs (``photo_folders.py``: random crops
of scikit-image photos, a quarter EXIF-rotated, a few corrupt files) are decoded to
``--image-size`` px two ways, each in a fresh Python process so that its peak RSS
(``VmHWM`` in ``/proc/self/status``) belongs to that run alone:

- ``old``: ``load_dataset("imagefolder:<folder>", image_size=...)``, main's path: serial
  decode in the driver, the whole pool stacked in driver memory;
- ``new``: ``list_images`` (listing only) + ``jobs.ingest.image_dataset`` iterated to the
  end in batches of 256 on a local 2-CPU Ray instance: decoding in Ray Data tasks, the
  driver holding the listing and a bounded window of batches.

Seconds cover listing, decoding and iteration; starting Ray is reported apart. On a shared,
overloaded machine wall time mostly measures the queue for the CPU, so CPU time is
reported too: the driver's, plus (new path) the decode tasks' total from Ray Data's
stats; "images per CPU-s" compares the work each path does per image. Folders
are generated once under ``--root`` and reused; the smaller sizes are hard links to the
first files of the largest.

Example:
    python -m jobs.benchmarks.data_scale --sizes 2000 8000 --image-size 224
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import re
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from jobs.benchmarks.photo_folders import make_photo_folder

DEFAULT_ROOT = Path("runs/benchmarks/data_scale")
#: Corrupt files per folder (truncated, text, empty), reported by the new path.
CORRUPT = 6


def peak_rss_mb() -> float:
    """This process's peak resident memory (``VmHWM``) in MiB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmHWM in /proc/self/status (Linux only)")


def photo_folder(root: Path, n: int, largest: int) -> Path:
    """``root/photos_<n>``: ``n`` labeled photos (+ corrupt files), generated or linked once.

    A folder of ``n`` photos is made of hard links to the first ``n`` photos of the
    smallest existing folder that has at least ``n`` (generated with the same seed, the
    first ``n`` photos are the same), else of a folder of ``largest`` generated now.
    """
    folder = root / f"photos_{n}"
    if (folder / "photos.json").exists():
        return folder
    existing = sorted(
        (int(p.parent.name.split("_")[1]), p.parent)
        for p in root.glob("photos_*/photos.json")
        if p.parent.name.split("_")[1].isdigit() and int(p.parent.name.split("_")[1]) >= n
    )
    if existing:
        full = existing[0][1]
    else:
        full = root / f"photos_{largest}"
        started = time.perf_counter()
        make_photo_folder(full, largest, corrupt=CORRUPT, seed=0)
        print(f"generated {largest} photos in {time.perf_counter() - started:.0f} s", file=sys.stderr)
    if full != folder:
        # The first n photos (names carry a global index), hard-linked.
        for src in sorted(full.rglob("*.jpg")):
            index = int(src.stem.rsplit("_", 1)[1])
            if src.name.startswith("bad_") or index < n:
                dst = folder / src.relative_to(full)
                dst.parent.mkdir(parents=True, exist_ok=True)
                if not dst.exists():
                    os.link(src, dst)
        (folder / "photos.json").write_text(json.dumps({"images": n, "linked_from": str(full)}) + "\n")
    return folder


def measure_old(folder: Path, image_size: int) -> dict[str, Any]:
    from polyclip.data.datasets import load_dataset

    started, cpu_started = time.perf_counter(), time.process_time()
    dataset = load_dataset(f"imagefolder:{folder}", image_size=image_size)
    seconds = time.perf_counter() - started
    return {"images": len(dataset.train), "skipped": len(dataset.skipped), "seconds": seconds,
            "cpu_s": time.process_time() - cpu_started, "ray_start_s": 0.0}


_UNITS = {"us": 1e-6, "ms": 1e-3, "s": 1.0}


def decode_cpu_seconds(stats_text: str) -> float:
    """Total remote CPU time of the decode operator, read from ``Dataset.stats()``."""
    section = stats_text.split("MapBatches(_DecodeBatch)", 1)[-1]
    match = re.search(r"Remote cpu time:.*?([0-9.]+)(us|ms|s) total", section)
    return float(match.group(1)) * _UNITS[match.group(2)] if match else float("nan")


def measure_new(folder: Path, image_size: int, batch_size: int) -> dict[str, Any]:
    import numpy as np
    import ray

    from jobs.ingest import IngestStats, image_dataset
    from polyclip.data.sources import class_names_of, list_images

    started = time.perf_counter()
    for attempt in range(3):
        # On a loaded machine the raylet can miss Ray's fixed 30 s registration window.
        try:
            ray.init(address="local", num_cpus=2, include_dashboard=False, logging_level=logging.ERROR,
                     log_to_driver=False)
            break
        except Exception:
            ray.shutdown()
            if attempt == 2:
                raise
    ray_start = time.perf_counter() - started
    started = time.perf_counter()
    table = list_images(str(folder), labeled=True)
    listed = time.perf_counter() - started
    stats = IngestStats.create()
    images, checksum = 0, 0
    cpu_started = time.process_time()
    dataset = image_dataset(table, image_size, class_names=class_names_of(table), stats=stats)
    for batch in dataset.iter_batches(batch_size=batch_size, batch_format="numpy"):
        images += len(batch["row"])
        checksum += int(np.asarray(batch["image"][:, :, ::37, ::37], dtype=np.int64).sum())
    seconds = time.perf_counter() - started
    driver_cpu = time.process_time() - cpu_started
    skipped = stats.summary()
    ray.shutdown()
    return {"images": images, "skipped": skipped["skipped"], "by_reason": skipped["by_reason"], "seconds": seconds,
            "cpu_s": driver_cpu + decode_cpu_seconds(dataset.stats()), "driver_cpu_s": driver_cpu,
            "list_s": listed, "ray_start_s": ray_start, "checksum": checksum}


def _measure(args: argparse.Namespace) -> None:
    folder = Path(args.folder)
    if args.measure == "old":
        result = measure_old(folder, args.image_size)
    else:
        result = measure_new(folder, args.image_size, args.batch_size)
    result |= {"path": args.measure, "images_per_s": result["images"] / result["seconds"],
               "images_per_cpu_s": result["images"] / result["cpu_s"],
               "driver_peak_rss_mb": peak_rss_mb()}
    print("RESULT " + json.dumps(result), flush=True)


def run_one(path: str, folder: Path, image_size: int, batch_size: int, timeout_s: float) -> dict[str, Any]:
    """Measure one path on one folder in a fresh interpreter."""
    command = [sys.executable, "-m", "jobs.benchmarks.data_scale", "--measure", path, "--folder", str(folder),
               "--image-size", str(image_size), "--batch-size", str(batch_size)]
    env = os.environ | {"RAY_USAGE_STATS_ENABLED": "0", "RAY_AUTH_MODE": "disabled"}
    done = subprocess.run(command, capture_output=True, text=True, timeout=timeout_s, env=env, check=False)
    for line in done.stdout.splitlines():
        if line.startswith("RESULT "):
            return dict(json.loads(line[len("RESULT "):]))
    raise RuntimeError(f"{path} on {folder} failed ({done.returncode}):\n{done.stderr[-3000:]}")


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[2000, 8000])
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--paths", nargs="+", default=["old", "new"], choices=["old", "new"])
    parser.add_argument("--root", default=str(DEFAULT_ROOT))
    parser.add_argument("--timeout-s", type=float, default=600)
    parser.add_argument("--measure", choices=["old", "new"], help=argparse.SUPPRESS)
    parser.add_argument("--folder", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.measure:
        _measure(args)
        return []
    root = Path(args.root)
    largest = max(args.sizes)
    results = []
    for n in sorted(args.sizes):
        folder = photo_folder(root, n, largest)
        for path in args.paths:
            result = run_one(path, folder, args.image_size, args.batch_size, args.timeout_s) | {"n": n}
            print(json.dumps(result), file=sys.stderr, flush=True)
            results.append(result)
    load = os.getloadavg()
    lines = [
        f"image size {args.image_size}, 2-CPU local Ray, load average {load[0]:.1f} at the end",
        "| N | path | driver peak RSS (MiB) | images | skipped | seconds | images/s | images per CPU-s |",
        "|---|---|---|---|---|---|---|---|",
    ]
    lines += [
        f"| {r['n']} | {r['path']} | {r['driver_peak_rss_mb']:.0f} | {r['images']} | {r['skipped']} | "
        f"{r['seconds']:.1f} | {r['images_per_s']:.0f} | {r['images_per_cpu_s']:.0f} |"
        for r in results
    ]
    print("\n".join(lines))
    out = root / "results.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    from polyclip.io import atomic_write_json

    atomic_write_json(out, {"command": " ".join([Path(sys.executable).name, "-m", "jobs.benchmarks.data_scale",
                                                 *(argv if argv is not None else sys.argv[1:])]),
                            "load_average": load, "results": results})
    return results


if __name__ == "__main__":
    main()
