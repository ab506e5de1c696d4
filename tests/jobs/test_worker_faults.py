"""The fault-injection helpers without Ray: process look-up and reading a run's Ray storage."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from jobs.trainer import HISTORY_FILE, STATE_FILE
from jobs.worker_faults import (
    SNAPSHOT_FILE,
    descendants,
    process_title,
    reported_history,
    train_workers,
    written_history,
)


def _checkpoint(storage: Path, name: str, epochs: int, *, complete: bool = True) -> None:
    folder = storage / name
    folder.mkdir(parents=True)
    (folder / HISTORY_FILE).write_text(json.dumps([{"epoch": e + 1} for e in range(epochs)]))
    if complete:
        (folder / STATE_FILE).write_bytes(b"state")


def test_descendants_and_titles_find_only_own_children():
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        assert child.pid in descendants(os.getpid())
        assert "time.sleep(30)" in process_title(child.pid)
        assert child.pid not in train_workers()  # not titled ray::RayTrainWorker
        assert descendants(child.pid) == []
    finally:
        child.kill()
        child.wait()
    assert process_title(child.pid) == ""


def test_written_and_reported_history(tmp_path):
    assert written_history(tmp_path) == [] and reported_history(tmp_path) == []
    _checkpoint(tmp_path, "checkpoint_a", 2)
    _checkpoint(tmp_path, "checkpoint_b", 3)
    _checkpoint(tmp_path, "checkpoint_c", 4, complete=False)  # still being uploaded: no state.pt
    assert [h["epoch"] for h in written_history(tmp_path)] == [1, 2, 3]
    # Ray has registered only checkpoint_a: that is what a restart resumes from.
    (tmp_path / SNAPSHOT_FILE).write_text(json.dumps({"latest_checkpoint_result": {
        "checkpoint_dir_name": "checkpoint_a", "metrics": {"epoch": 2}}}))
    assert [h["epoch"] for h in reported_history(tmp_path)] == [1, 2]
    (tmp_path / SNAPSHOT_FILE).write_text("{half a json")
    assert reported_history(tmp_path) == []
