"""Peak memory of a FixMatch job on image folders as the pool grows: streamed ingest vs the payload path.

Runs ``jobs.train`` with ``jobs/configs/semi/fm40_fixmatch.yaml`` on generated folders of
500x375 JPEG photos decoded at 224 px (the whole pool unlabeled, 3 steps, 1 worker), once
per pool size, each in a fresh process with its own local Ray cluster, and records:

* the driver's peak RSS (``VmHWM``);
* the peak RSS of the Train worker (``ray::RayTrainWorker``) and of any other Ray worker
  process (Ray Data decode tasks), sampled every 0.2 s from ``/proc``;
* the wall time of the job.

With ``--baseline-tree DIR`` (a checkout of an older commit, e.g. ``git worktree add
/tmp/base f34fcaa``) the same runs are made with that tree's code in the same session,
so the two paths are compared side by side on the same photos.

``--throughput`` measures instead the steady-state FixMatch images/s (the last of 3
epochs, so start-up is excluded) on Fashion-MNIST with 1 and 2 Train workers on the same
cores, alternating the two trees within every repeat; medians over repeats.

Usage::

    python -m jobs.benchmarks.streaming_ingest --sizes 2000 8000 [--baseline-tree /tmp/base]
    python -m jobs.benchmarks.streaming_ingest --throughput --workers 1 2 --repeats 3 [--baseline-tree /tmp/base]

Without ``--baseline-tree``, ``--throughput`` compares this code's streamed pool with the same
code shipping the pool in the object-store payload (``data.stream_pool=false``): the ingest
alone, with everything else (augmentations, the loop) equal.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

from jobs.benchmarks.common import command_line, out_dir
from jobs.benchmarks.photo_folders import PHOTO_ROOT
from polyclip.io import atomic_write_json, atomic_write_text
from polyclip.reports.tables import markdown_table

ROOT = Path(__file__).resolve().parents[2]
CONFIG = "jobs/configs/semi/fm40_fixmatch.yaml"
DRIVER = """
import json, sys
from jobs import train
metrics = train.main(sys.argv[1:])
hwm = next(int(l.split()[1]) for l in open("/proc/self/status") if l.startswith("VmHWM"))
last = metrics["history"][-1]
print("BENCH " + json.dumps({"driver_hwm_kb": hwm, "top1": metrics["test"]["top1"],
                             "images_per_s": last.get("train_images_per_s")}))
"""


def _rss_kb(pid: int) -> tuple[str, int, int] | None:
    """``(cmdline, VmRSS, RssAnon)`` in KiB. RssAnon leaves out the object store's shared pages
    that a Ray worker has touched (they stay mapped after the objects are freed)."""
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return None
    fields = {line.split(":")[0]: int(line.split()[1]) for line in status.splitlines()
              if line.startswith(("VmRSS", "RssAnon"))}
    return cmdline, fields.get("VmRSS", 0), fields.get("RssAnon", 0)


def _parent(pid: int) -> int:
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return 0
    return next((int(line.split()[1]) for line in status.splitlines() if line.startswith("PPid:")), 0)


def _descends_from(pid: int, root: int) -> bool:
    while pid > 1:
        if pid == root:
            return True
        pid = _parent(pid)
    return False


class RayProcessSampler(threading.Thread):
    """Peak RSS of the Ray worker processes of one job (Train workers apart from the rest).

    Only descendants of ``root`` (the job's driver: its raylet starts the workers) count,
    so other Ray sessions on a shared machine do not leak into the figures.
    """

    def __init__(self, root: int) -> None:
        super().__init__(daemon=True)
        self.root = root
        self.peaks = {"train_worker_kb": 0, "other_ray_worker_kb": 0, "train_worker_anon_kb": 0,
                      "other_ray_worker_anon_kb": 0}
        self.largest_other = ""
        self.stop = threading.Event()

    def run(self) -> None:
        while not self.stop.is_set():
            for name in os.listdir("/proc"):
                if not name.isdigit() or not _descends_from(int(name), self.root):
                    continue
                found = _rss_kb(int(name))
                if found is None or ("default_worker.py" not in found[0] and not found[0].startswith("ray::")):
                    continue
                kind = "train_worker" if "RayTrainWorker" in found[0] else "other_ray_worker"
                if kind == "other_ray_worker" and found[1] > self.peaks["other_ray_worker_kb"]:
                    self.largest_other = found[0][:60]
                self.peaks[f"{kind}_kb"] = max(self.peaks[f"{kind}_kb"], found[1])
                self.peaks[f"{kind}_anon_kb"] = max(self.peaks[f"{kind}_anon_kb"], found[2])
            time.sleep(0.2)


def run_once(tree: Path, photos: Path, size: int, out: Path, label: str) -> dict[str, Any]:
    overrides = [f"name=ingest-{label}-{size}", f"data.dataset=imagefolder:{photos}", "data.image_size=224",
                 "data.labels_per_class=4", "data.val_per_class=4", "data.test_limit=40", "data.unlabeled=null",
                 "train.epochs=1", "train.steps_per_epoch=3", "train.batch_size=8", "method.mu=7",
                 f"run.output_dir={out / 'runs'}", f"run.feature_store={out / 'cache'}"]
    env = {**os.environ, "PYTHONPATH": f"{tree / 'library'}:{tree}", "RAY_USAGE_STATS_ENABLED": "0",
           "RAY_AUTH_MODE": "disabled"}
    tic = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-c", DRIVER, "--config", CONFIG, *overrides], cwd=tree, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    sampler = RayProcessSampler(proc.pid)
    sampler.start()
    stdout, stderr = proc.communicate(timeout=3600)
    seconds = time.perf_counter() - tic
    sampler.stop.set()
    sampler.join()
    line = next((x for x in stdout.splitlines() if x.startswith("BENCH ")), None)
    if proc.returncode != 0 or line is None:
        (out / f"{label}-{size}.log").write_text(stdout + stderr)
        raise RuntimeError(f"{label} run with {size} photos failed (log: {out / f'{label}-{size}.log'})")
    result = json.loads(line[6:])
    return {"path": label, "photos": size, "driver_peak_mb": round(result["driver_hwm_kb"] / 1024),
            "train_worker_peak_mb": round(sampler.peaks["train_worker_kb"] / 1024),
            "train_worker_anon_mb": round(sampler.peaks["train_worker_anon_kb"] / 1024),
            "other_ray_worker_peak_mb": round(sampler.peaks["other_ray_worker_kb"] / 1024),
            "other_ray_worker_anon_mb": round(sampler.peaks["other_ray_worker_anon_kb"] / 1024),
            "largest_other": sampler.largest_other,
            "seconds": round(seconds, 1)}


def throughput_once(tree: Path, workers: int, out: Path, label: str, steps: int, extra: tuple[str, ...] = ()) -> float:
    """Steady-state images/s (last of 3 epochs) of FixMatch on Fashion-MNIST with ``workers`` Train workers."""
    # A new run name each time: an existing run would be resumed (or refused), not timed.
    overrides = [f"name=tput-{label}-{workers}-{time.time_ns()}", "data.unlabeled=20000", "train.epochs=3",
                 f"train.steps_per_epoch={steps}", "train.eval_every=3", "train.batch_size=16", "method.mu=7",
                 f"scaling.num_workers={workers}", "scaling.cpus_per_worker=1", "data.test_limit=500",
                 f"run.output_dir={out / 'runs'}", f"run.feature_store={out / 'cache'}", *extra]
    env = {**os.environ, "PYTHONPATH": f"{tree / 'library'}:{tree}", "RAY_USAGE_STATS_ENABLED": "0",
           "RAY_AUTH_MODE": "disabled"}
    for _ in range(3):  # on a loaded machine the raylet can miss Ray's fixed start-up window: start again
        proc = subprocess.run([sys.executable, "-c", DRIVER, "--config", CONFIG, *overrides], cwd=tree, env=env,
                              capture_output=True, text=True, timeout=3600)
        if "timed out during startup" not in proc.stderr:
            break
    line = next((x for x in proc.stdout.splitlines() if x.startswith("BENCH ")), None)
    if proc.returncode != 0 or line is None:
        (out / f"tput-{label}-{workers}.log").write_text(proc.stdout + proc.stderr)
        raise RuntimeError(f"{label} throughput run failed (log: {out / f'tput-{label}-{workers}.log'})")
    return float(json.loads(line[6:])["images_per_s"])


def throughput(args: argparse.Namespace, out: Path) -> list[dict[str, Any]]:
    import statistics

    # Without a baseline tree, the same code with the pool in the object-store payload (data.stream_pool=false).
    baseline = ((args.baseline_tree.resolve(), ()) if args.baseline_tree is not None
                else (ROOT, ("data.stream_pool=false",)))
    rows = []
    for workers in args.workers:
        runs: dict[str, list[float]] = {"streamed": [], "payload": []}
        for repeat in range(args.repeats):
            order = [("streamed", ROOT, ()), ("payload", *baseline)]
            for label, tree, extra in order if repeat % 2 == 0 else order[::-1]:
                runs[label].append(throughput_once(tree, workers, out, label, args.steps, extra))
                print(json.dumps({"workers": workers, "path": label, "images_per_s": runs[label][-1]}), flush=True)
        streamed, payload = statistics.median(runs["streamed"]), statistics.median(runs["payload"])
        rows.append({"workers": workers, "streamed_img_s": round(streamed, 1), "payload_img_s": round(payload, 1),
                     "ratio": round(streamed / payload, 3), "repeats": args.repeats})
    return rows


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=[2000, 8000])
    parser.add_argument("--baseline-tree", type=Path, default=None, help="checkout of the code to compare with")
    parser.add_argument("--photos", default=str(PHOTO_ROOT), help="photo folders, generated once and shared")
    parser.add_argument("--throughput", action="store_true", help="steady-state images/s instead of memory")
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--steps", type=int, default=20, help="steps per epoch in --throughput")
    args = parser.parse_args(argv)
    if args.throughput:
        out = out_dir("streaming_throughput").resolve()
        rows = throughput(args, out)
        table = markdown_table(rows)
        atomic_write_json(out / "results.json", {"command": command_line(), "rows": rows})
        atomic_write_text(out / "results.md", f"`{command_line()}`\n\n{table}\n")
        print(table)
        return rows
    from jobs.benchmarks.photo_folders import sized_photo_folder

    out = out_dir("streaming_ingest").resolve()
    rows = []
    for size in args.sizes:
        photos = sized_photo_folder(Path(args.photos), size, max(args.sizes)).resolve()
        trees = [("streamed", ROOT)] + ([("payload (baseline)", args.baseline_tree.resolve())]
                                         if args.baseline_tree else [])
        for label, tree in trees:
            rows.append(run_once(tree, photos, size, out, label.split()[0]))
            rows[-1]["path"] = label
            print(json.dumps(rows[-1]), flush=True)
    table = markdown_table(rows)
    atomic_write_json(out / "results.json", {"command": command_line(), "rows": rows})
    atomic_write_text(out / "results.md", f"`{command_line()}`\n\n{table}\n")
    print(table)
    return rows


if __name__ == "__main__":
    main()
