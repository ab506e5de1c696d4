"""Fault tolerance: a training worker SIGKILLed mid-run is restarted from the last checkpoint,
and a checkpoint write interrupted by a crash never leaves a half-written ``state.pt``."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from jobs import train
from jobs.config import load_config
from jobs.trainer import RESUMES_FILE, STATE_FILE
from jobs.worker_faults import WorkerKiller, train_workers
from polyclip.io import atomic_write_with

ROOT = Path(__file__).resolve().parents[2]
CONFIG = str(ROOT / "jobs" / "configs" / "fault_injection.yaml")


# Slow: the restart starts a new worker process (torch, the task, the process group); on this
# shared 2-core machine the test took 3.5 min after Ray was up, well over the default budget.
@pytest.mark.slow
@pytest.mark.timeout(1800)
def test_killed_worker_resumes_from_last_checkpoint(ray_cluster, tmp_path):
    """SIGKILL the Ray Train worker half an epoch after Ray registered the epoch-2 checkpoint."""
    overrides = [f"run.output_dir={tmp_path}", f"run.feature_store={tmp_path / 'cache'}"]
    cfg = load_config(CONFIG, overrides)
    killer = WorkerKiller(Path(str(cfg.run.storage_path)) / cfg.name, kills=1, min_epochs=2, timeout=1200)
    killer.start()
    try:
        metrics = train.main(["--config", CONFIG, *overrides])
    finally:
        killer.stop()
        killer.join(timeout=10)
    assert killer.error is None, killer.error
    assert len(killer.done) == 1, "no worker was killed"
    kill = killer.done[0]
    assert kill.pids and not set(kill.pids) & set(train_workers())  # they did die

    epochs = cfg.train.epochs
    completed = kill.completed_epochs
    assert 2 <= completed < epochs, "the kill did not land in the middle of the run"
    # Every epoch exactly once, and those finished before the kill exactly as they were reported.
    assert [entry["epoch"] for entry in metrics["history"]] == list(range(1, epochs + 1))
    assert metrics["history"][:completed] == kill.history
    # One restart, from the last checkpoint Ray had registered before the kill: no reported epoch lost.
    run_dir = tmp_path / cfg.name
    assert json.loads((run_dir / "checkpoint" / RESUMES_FILE).read_text()) == [completed]
    stored = json.loads((run_dir / "metrics.json").read_text())
    assert stored["epochs"] == epochs and stored["test"]["top1"] == metrics["test"]["top1"]
    assert (run_dir / "checkpoint" / "predictions.npz").exists()
    assert torch.load(run_dir / "checkpoint" / STATE_FILE, weights_only=True)["epoch"] == epochs


def test_interrupted_checkpoint_write_leaves_no_state_file(tmp_path):
    target = tmp_path / "checkpoint" / STATE_FILE

    def crash_half_way(path: Path) -> None:
        torch.save({"epoch": 3, "weights": torch.zeros(1000)}, path)
        with open(path, "r+b") as handle:  # a torn write: only the first half reached the disk
            handle.truncate(path.stat().st_size // 2)
        raise KeyboardInterrupt("worker interrupted inside torch.save")

    with pytest.raises(KeyboardInterrupt):
        atomic_write_with(target, crash_half_way)
    assert not target.exists()
    assert list(target.parent.iterdir()) == []  # the temporary file is gone too

    # Over an existing checkpoint: the old state stays whole and loadable.
    atomic_write_with(target, lambda p: torch.save({"epoch": 2}, p))
    with pytest.raises(KeyboardInterrupt):
        atomic_write_with(target, crash_half_way)
    assert torch.load(target, weights_only=False) == {"epoch": 2}
    assert [p.name for p in target.parent.iterdir()] == [STATE_FILE]


def test_process_killed_mid_write_never_leaves_a_torn_state_file(tmp_path):
    """SIGKILL inside the write callback (no Python cleanup runs): only a hidden temp file is left."""
    target = tmp_path / STATE_FILE
    script = textwrap.dedent(f"""
        import os, signal, sys, torch
        from polyclip.io import atomic_write_with

        def write(path):
            torch.save({{"epoch": int(sys.argv[1]), "weights": torch.zeros(100_000)}}, path)
            if sys.argv[1] == "4":
                os.kill(os.getpid(), signal.SIGKILL)

        atomic_write_with({str(target)!r}, write)
    """)
    ok = subprocess.run([sys.executable, "-c", script, "3"], capture_output=True, text=True, timeout=120)
    assert ok.returncode == 0, ok.stderr
    killed = subprocess.run([sys.executable, "-c", script, "4"], capture_output=True, text=True, timeout=120)
    assert killed.returncode == -signal.SIGKILL
    assert torch.load(target, weights_only=False)["epoch"] == 3
    leftovers = [p.name for p in tmp_path.iterdir() if p.name != STATE_FILE]
    assert len(leftovers) == 1 and leftovers[0].startswith(f".{STATE_FILE}.") and leftovers[0].endswith(".tmp")
