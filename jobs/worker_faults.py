"""Fault injection for training runs: find this process's Ray Train workers, kill them, and read
how far a run got from the checkpoints in its Ray storage.

Used by ``tests/jobs/test_fault_tolerance.py`` and ``jobs/benchmarks/fault_injection.py``.
Workers are looked up among the *descendants* of a given process (the driver that started
its own local Ray instance), so other Ray clusters on the same machine are never touched.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from jobs.trainer import HISTORY_FILE, STATE_FILE

#: The process title (setproctitle) of a Ray Train v2 worker actor in Ray 2.60,
#: e.g. ``ray::RayTrainWorker.run_train_fn``.
WORKER_TITLE = "ray::RayTrainWorker"


def descendants(pid: int) -> list[int]:
    """PIDs of every process below ``pid`` (read from ``/proc``; Linux only)."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            text = stat.read_text()
        except OSError:  # exited meanwhile
            continue
        ppid = int(text.rsplit(")", 1)[1].split()[1])  # the command name may contain spaces
        children.setdefault(ppid, []).append(int(stat.parent.name))
    out, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            out.append(child)
            todo.append(child)
    return out


def process_title(pid: int) -> str:
    """The command line of ``pid`` as ``ps`` shows it (``""`` if it is gone)."""
    try:
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return ""
    return raw.replace(b"\0", b" ").decode(errors="replace").strip()


def train_workers(root_pid: int | None = None) -> list[int]:
    """PIDs of the Ray Train worker actors below ``root_pid`` (default: this process)."""
    root = os.getpid() if root_pid is None else root_pid
    return sorted(pid for pid in descendants(root) if process_title(pid).startswith(WORKER_TITLE))


#: Ray Train (v2) keeps its record of *reported* checkpoints here, in the run's storage.
SNAPSHOT_FILE = "checkpoint_manager_snapshot.json"


def written_history(storage: str | os.PathLike[str]) -> list[dict[str, Any]]:
    """The epoch history of the newest complete checkpoint folder in a run's Ray storage (``[]`` if none).

    A folder appears when the worker has uploaded it, up to one health-check interval
    (``RAY_TRAIN_HEALTH_CHECK_INTERVAL_S``, 2 s) before the controller registers it; a
    worker that dies in between loses that report, and the run resumes from the one before.

    Args:
        storage: ``<run.storage_path>/<name>``, where Ray Train writes ``checkpoint_*`` folders.
    """
    best: list[dict[str, Any]] = []
    for folder in Path(storage).glob("checkpoint_*"):
        try:
            if not (folder / STATE_FILE).exists():
                continue
            history = json.loads((folder / HISTORY_FILE).read_text())
        except (OSError, ValueError):  # being uploaded, or being deleted by Ray (num_to_keep)
            continue
        if len(history) > len(best):
            best = history
    return best


def reported_history(storage: str | os.PathLike[str]) -> list[dict[str, Any]]:
    """The epoch history of the latest checkpoint Ray Train has registered: the one a restart resumes from."""
    try:
        snapshot = json.loads((Path(storage) / SNAPSHOT_FILE).read_text())
        latest = snapshot.get("latest_checkpoint_result") or {}
        name = latest.get("checkpoint_dir_name")
        if not name:
            return []
        return list(json.loads((Path(storage) / name / HISTORY_FILE).read_text()))
    except (OSError, ValueError):  # no report yet, or the snapshot is being replaced
        return []


@dataclass
class Kill:
    """One injected fault."""

    time: float  #: seconds since the killer started
    pids: list[int]
    completed_epochs: int  #: epochs in the latest checkpoint Ray Train had registered when the worker died
    written_epochs: int  #: epochs in the newest checkpoint folder the worker had written by then
    history: list[dict[str, Any]] = field(repr=False)  #: of the registered checkpoint


class WorkerKiller(threading.Thread):
    """Kills the run's Ray Train workers with SIGKILL, ``kills`` times, in the middle of epochs.

    Before each kill it waits until Ray Train has registered a checkpoint of at least
    ``min_epochs`` epochs, and of one more epoch than at the previous kill (so each kill hits
    a restarted worker group), then ``delay(history)`` seconds, given that checkpoint's history.

    Args:
        storage: ``<run.storage_path>/<name>``.
        kills: How many faults to inject.
        min_epochs: Checkpointed epochs before the first kill.
        delay: Seconds to wait once the checkpoint condition holds (default: half an epoch).
        root_pid: Whose descendants are searched for workers (default: this process).
        timeout: Give up (recording ``error``) if a condition takes longer than this.
    """

    def __init__(self, storage: str | os.PathLike[str], *, kills: int = 1, min_epochs: int = 1,
                 delay: Any = None, root_pid: int | None = None, timeout: float = 300.0) -> None:
        super().__init__(daemon=True, name="worker-killer")
        self.storage, self.kills, self.min_epochs = Path(storage), kills, min_epochs
        self.delay = delay or (lambda history: 0.5 * float(history[-1]["epoch_seconds"]))
        self.root_pid, self.timeout = root_pid, timeout
        self.done: list[Kill] = []
        self.error: str | None = None
        self._stop_event = threading.Event()

    def stop(self) -> None:
        """Stop injecting (the run is over)."""
        self._stop_event.set()

    def _wait_for(self, epochs: int) -> list[dict[str, Any]] | None:
        deadline = time.monotonic() + self.timeout
        while not self._stop_event.is_set():
            history = reported_history(self.storage)
            if len(history) >= epochs:
                return history
            if time.monotonic() > deadline:
                self.error = f"no checkpoint of epoch {epochs} in {self.storage} after {self.timeout:.0f} s"
                return None
            time.sleep(0.1)
        return None

    def run(self) -> None:
        start = time.monotonic()
        target = self.min_epochs
        for _ in range(self.kills):
            history = self._wait_for(target)
            if history is None or self._stop_event.wait(self.delay(history)):
                return
            pids = train_workers(self.root_pid)
            if not pids:
                self.error = f"no process titled {WORKER_TITLE!r} below pid {self.root_pid or os.getpid()}"
                return
            for pid in pids:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            at = time.monotonic() - start
            # A poll of the controller already under way may still register a report; let it land.
            time.sleep(0.5)
            history = reported_history(self.storage)
            self.done.append(Kill(at, pids, len(history), len(written_history(self.storage)), history))
            target = len(history) + 1


def start_local_ray(num_cpus: int, attempts: int = 3) -> float:
    """``jobs.runtime.init_ray`` for a local instance, retried: on a saturated machine the raylet can
    miss Ray's fixed 30 s registration deadline. Returns the seconds of the successful attempt."""
    import ray

    from jobs.runtime import init_ray

    for attempt in range(1, attempts + 1):
        tic = time.perf_counter()
        try:
            init_ray(None, num_cpus=num_cpus)
            return time.perf_counter() - tic
        except Exception as exc:  # Ray raises a bare Exception for this time-out
            if attempt == attempts or "timed out during startup" not in str(exc):
                raise
            ray.shutdown()
            print(f"Ray did not start (attempt {attempt}/{attempts}: {exc}); retrying", flush=True)
    raise AssertionError("unreachable")
