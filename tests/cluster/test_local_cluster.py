"""cluster/local/up.sh + down.sh for real: a token-authenticated head on spare ports takes a
job with the token, refuses one without it, runs a real training job submitted the way
cluster/README.md tells a laptop user to (``--working-dir .``, ``--runtime-env``), answers
``ray job status`` / ``logs`` / ``stop``, and down.sh leaves none of its processes."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
LOCAL = ROOT / "cluster" / "local"
RAY = ROOT / ".venv" / "bin" / "ray"

# About 2 minutes on 2 quiet cores (a head, a real training job, stop): opt-in.
pytestmark = [pytest.mark.ray, pytest.mark.slow]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _state(state_dir: Path) -> dict[str, str]:
    out = {}
    for line in (state_dir / "head.env").read_text().splitlines():
        if "=" in line and not line.startswith("#"):
            k, v = line.split("=", 1)
            out[k] = v
    return out


def _marked_pids(cluster_id: str) -> list[int]:
    pids = []
    for d in Path("/proc").glob("[0-9]*"):
        try:
            if f"POLYCLIP_RAY_CLUSTER_ID={cluster_id}".encode() in (d / "environ").read_bytes().split(b"\0"):
                pids.append(int(d.name))
        except OSError:
            continue
    return pids


def _exited(pid: int, timeout: float = 10.0) -> bool:
    """True once ``pid`` is gone or a zombie (killed, waiting for an init that may reap late)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except (OSError, IndexError):
            return True
        if state in ("Z", "X"):
            return True
        time.sleep(0.2)
    return False


def _http_status(url: str, token: str | None) -> int:
    req = urllib.request.Request(url)
    if token is not None:
        req.add_header("Authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(req, timeout=10) as r:
            return r.status
    except urllib.error.HTTPError as e:
        return e.code


def _ray_job(args: list[str], env: dict[str, str], timeout: float = 180) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(RAY), "job", *args], env=env, capture_output=True, text=True, timeout=timeout,
                          cwd=ROOT)


def _wait_status(address: str, job_id: str, env: dict[str, str], want: str, timeout: float = 120) -> str:
    """Poll ``ray job status`` until its answer contains ``want``. The CLI prints ``Job '<id>' succeeded``,
    ``Job '<id>' was stopped``, ``Job '<id>' failed`` or ``Status for job '<id>': RUNNING``."""
    deadline = time.monotonic() + timeout
    while True:
        out = _ray_job(["status", "--address", address, job_id], env)
        assert out.returncode == 0, out.stdout + out.stderr
        if want in out.stdout:
            return out.stdout
        assert time.monotonic() < deadline, f"job {job_id} never reached {want}: {out.stdout}"
        time.sleep(1)


def test_up_submit_with_and_without_token_down(tmp_path: Path):
    if not RAY.exists():
        pytest.skip("needs the project venv (.venv/bin/ray)")
    state_dir = tmp_path / "state"
    ray_port, dash_port = _free_port(), _free_port()
    base = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_AUTH", "RAY_ADDRESS", "RAY_API_SERVER"))}
    base.update(RAY_USAGE_STATS_ENABLED="0", HOME=str(tmp_path))  # no ~/.ray/auth_token of the user
    env = dict(base, POLYCLIP_STATE_DIR=str(state_dir), POLYCLIP_RAY_PORT=str(ray_port),
               POLYCLIP_DASHBOARD_PORT=str(dash_port), POLYCLIP_NUM_CPUS="2", POLYCLIP_RAY_AUTH="token",
               POLYCLIP_RAY_TEMP_DIR=f"/tmp/polyclip-ray-test-{ray_port}", POLYCLIP_STOP_TIMEOUT="15")
    address = f"http://127.0.0.1:{dash_port}"

    up = subprocess.run([str(LOCAL / "up.sh")], env=env, capture_output=True, text=True, timeout=240)
    try:
        assert up.returncode == 0, up.stdout + up.stderr
        assert address in up.stdout
        state = _state(state_dir)
        token_file = state_dir / "auth_token"
        token = token_file.read_text().strip()
        assert len(token) == 64 and (token_file.stat().st_mode & 0o777) == 0o600
        head_pid = int(state["HEAD_PID"])
        assert _marked_pids(state["CLUSTER_ID"])

        # The raw job API: 401 without a token, 403 with a wrong one, 200 with it.
        assert _http_status(f"{address}/api/jobs/", None) == 401
        assert _http_status(f"{address}/api/jobs/", "0" * 64) == 403
        assert _http_status(f"{address}/api/jobs/", token) == 200

        # The CLI with the token (RAY_AUTH_MODE=token + RAY_AUTH_TOKEN_PATH) runs the job.
        with_token = dict(base, RAY_AUTH_MODE="token", RAY_AUTH_TOKEN_PATH=str(token_file))
        ok = subprocess.run([str(RAY), "job", "submit", "--address", address, "--", "python", "-c", "print(42)"],
                            env=with_token, capture_output=True, text=True, timeout=180, cwd=tmp_path)
        assert ok.returncode == 0, ok.stdout + ok.stderr
        assert "42" in ok.stdout and "succeeded" in ok.stdout

        # Without the token the same submission is refused.
        without = dict(base, RAY_AUTH_MODE="disabled")
        refused = subprocess.run([str(RAY), "job", "submit", "--address", address, "--", "python", "-c", "print(42)"],
                                 env=without, capture_output=True, text=True, timeout=120, cwd=tmp_path)
        assert refused.returncode != 0
        assert "Authentication required" in refused.stdout + refused.stderr

        # A real training job, submitted from the repo root as cluster/README.md says.
        runs = tmp_path / "runs"
        train_id = f"smoke-{ray_port}"
        job = _ray_job(["submit", "--address", address, "--submission-id", train_id, "--working-dir", ".",
                        "--runtime-env", "cluster/runtime_env.yaml", "--",
                        "python", "-m", "jobs.train", "--config", "jobs/configs/smoke_probe.yaml",
                        f"run.output_dir={runs}", f"run.feature_store={tmp_path / 'cache'}", "scaling.num_workers=1",
                        "train.epochs=2"], with_token, timeout=420)
        assert job.returncode == 0, job.stdout + job.stderr
        assert "succeeded" in job.stdout
        metrics = json.loads((runs / "smoke-probe" / "metrics.json").read_text())
        assert metrics["epochs"] == 2 and metrics["test"]["top1"] > 0.2
        assert (runs / "smoke-probe" / "checkpoint" / "state.pt").exists()
        _wait_status(address, train_id, with_token, f"Job '{train_id}' succeeded", timeout=10)
        logs = _ray_job(["logs", "--address", address, train_id], with_token)
        assert logs.returncode == 0, logs.stderr
        assert "rank 0 starts training at epoch 1/2" in logs.stdout
        assert f"run directory: {runs / 'smoke-probe'}" in logs.stdout

        # A long job: running, then stopped by `ray job stop`.
        sleep_id = f"sleep-{ray_port}"
        started = _ray_job(["submit", "--address", address, "--no-wait", "--submission-id", sleep_id, "--",
                            "python", "-c", "import time; print('sleeping', flush=True); time.sleep(600)"],
                           with_token)
        assert started.returncode == 0, started.stdout + started.stderr
        _wait_status(address, sleep_id, with_token, f"Status for job '{sleep_id}': RUNNING")
        stop = _ray_job(["stop", "--address", address, sleep_id], with_token, timeout=120)
        assert stop.returncode == 0, stop.stdout + stop.stderr
        _wait_status(address, sleep_id, with_token, f"Job '{sleep_id}' was stopped", timeout=60)
        # Nobody without the token may look at jobs either.
        peek = _ray_job(["status", "--address", address, sleep_id], without)
        assert peek.returncode != 0 and "Authentication required" in peek.stdout + peek.stderr
    finally:
        down = subprocess.run([str(LOCAL / "down.sh")], env=env, capture_output=True, text=True, timeout=120)
    assert down.returncode == 0, down.stdout + down.stderr
    assert not (state_dir / "head.env").exists()
    time.sleep(1)
    assert not _marked_pids(state["CLUSTER_ID"]), "processes of the head survived down.sh"
    assert _exited(head_pid), f"the head process {head_pid} survived down.sh"
    with socket.socket() as s:
        assert s.connect_ex(("127.0.0.1", dash_port)) != 0, "the dashboard still answers"
