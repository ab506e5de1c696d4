"""The commands README.md and serve/README.md document, run through the real CLIs.

Opt-in (minutes on 2 cores, a Ray head of its own on spare ports)::

    POLYCLIP_CLI_TESTS=1 .venv/bin/python -m pytest -m slow tests/test_documented_commands.py

``POLYCLIP_CLI_CONFIG=jobs/configs/demo.yaml`` submits the demo job itself instead of the
seconds-long smoke probe. The head is started with ``cluster/local/up.sh`` (auth disabled,
as ``make demo`` does) and stopped with ``cluster/local/down.sh``, never ``ray stop``. The
Serve commands use a copy of ``serve/config.yaml`` whose only changes are the HTTP port (a
free one) and the artifact (a small ensemble written here).
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
BIN = ROOT / ".venv" / "bin"
CLASSES = [f"c{i}" for i in range(10)]

pytestmark = [
    pytest.mark.slow,
    pytest.mark.ray,
    pytest.mark.skipif(os.environ.get("POLYCLIP_CLI_TESTS") != "1", reason="opt-in: set POLYCLIP_CLI_TESTS=1"),
]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _run(args: list[str], env: dict[str, str], timeout: float = 600, cwd: Path = ROOT) -> str:
    out = subprocess.run(args, env=env, capture_output=True, text=True, timeout=timeout, cwd=cwd)
    assert out.returncode == 0, f"{' '.join(args)} exited {out.returncode}:\n{out.stdout}\n{out.stderr}"
    return out.stdout + out.stderr


def _get(url: str) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=10) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()
    except (urllib.error.URLError, ConnectionError, TimeoutError):
        return 0, b""


def _wait_http(url: str, timeout: float = 420) -> bytes:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        status, body = _get(url)
        if status == 200:
            return body
        time.sleep(2)
    raise AssertionError(f"{url} did not answer 200 within {timeout} s")


@pytest.fixture(scope="module")
def head(tmp_path_factory):
    """A local head from cluster/local/up.sh on spare ports; its addresses and the CLI environment."""
    tmp = tmp_path_factory.mktemp("cli")
    ray_port, dash_port = _free_port(), _free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_AUTH", "RAY_ADDRESS", "RAY_API_SERVER"))}
    env.update(PATH=f"{BIN}:{env.get('PATH', '')}", RAY_USAGE_STATS_ENABLED="0", RAY_AUTH_MODE="disabled",
               POLYCLIP_RAY_AUTH="disabled", POLYCLIP_STATE_DIR=str(tmp / "state"),
               POLYCLIP_RAY_PORT=str(ray_port), POLYCLIP_DASHBOARD_PORT=str(dash_port), POLYCLIP_NUM_CPUS="2",
               POLYCLIP_RAY_TEMP_DIR=f"/tmp/polyclip-ray-cli-{ray_port}", POLYCLIP_STOP_TIMEOUT="15")
    _run([str(ROOT / "cluster" / "local" / "up.sh")], env, timeout=300)
    try:
        yield {"env": env, "tmp": tmp, "dashboard": f"http://127.0.0.1:{dash_port}", "gcs": f"127.0.0.1:{ray_port}"}
    finally:
        subprocess.run([str(ROOT / "cluster" / "local" / "down.sh")], env=env, timeout=120, check=False)


def test_ray_job_submit_and_logs_as_in_the_readme(head):
    config = os.environ.get("POLYCLIP_CLI_CONFIG", "jobs/configs/smoke_probe.yaml")
    runs = head["tmp"] / "runs"
    job_id = f"cli-{int(time.time())}"
    # README, "Two commands" and "Running on a Ray cluster" (auth disabled: no env.sh to source).
    out = _run(["ray", "job", "submit", "--address", head["dashboard"], "--working-dir", ".",
                "--submission-id", job_id, "--", "python", "-m", "jobs.train", "--config", config,
                f"run.output_dir={runs}"], head["env"], timeout=1800)
    assert "succeeded" in out
    logs = _run(["ray", "job", "logs", "--address", head["dashboard"], job_id], head["env"])
    assert "run directory:" in logs
    name = yaml.safe_load((ROOT / config).read_text())["name"]
    metrics = json.loads((runs / name / "metrics.json").read_text())
    assert metrics, "the job wrote an empty metrics.json"


@pytest.fixture(scope="module")
def serve_config(head):
    """serve/config.yaml with a free HTTP port and a small ensemble artifact written here."""
    import torch

    from polyclip.backbones import create_backbone
    from polyclip.ensemble.artifact import save_ensemble
    from polyclip.ensemble.combiner import TemperatureCombiner
    from polyclip.ensemble.heads import LinearHead
    from polyclip.ensemble.model import BackboneInfo, Ensemble

    torch.manual_seed(0)
    members = [create_backbone("pixels:12"), create_backbone("random:small_cnn@8", image_size=20)]
    infos = [BackboneInfo.from_backbone(b, name=f"m{i}") for i, b in enumerate(members)]
    heads = [LinearHead(torch.randn(10, b.num_features), torch.randn(10)) for b in members]
    combiners = [TemperatureCombiner([b.num_features for b in members[:k]], hidden=8) for k in (1, 2)]
    artifact = head["tmp"] / "ensemble"
    save_ensemble(artifact, Ensemble(infos, CLASSES, heads, combiners))
    config = yaml.safe_load((ROOT / "serve" / "config.yaml").read_text())
    port = _free_port()
    config["http_options"]["port"] = port
    config["applications"][0]["args"]["artifact"] = str(artifact)
    path = head["tmp"] / "serve.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path, f"http://127.0.0.1:{port}"


def test_serve_run_answers_then_stops_on_interrupt(head, serve_config):
    path, url = serve_config
    env = dict(head["env"], RAY_ADDRESS=head["gcs"])
    process = subprocess.Popen([str(BIN / "serve"), "run", str(path)], env=env, cwd=ROOT,
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        labels = json.loads(_wait_http(f"{url}/v1/labels"))
        assert labels["labels"] == CLASSES and labels["backbones"] == ["m0", "m1"]
        assert _get(f"{url}/healthz")[0] == 200
    finally:
        process.send_signal(signal.SIGINT)  # what Ctrl-C does: serve run shuts its applications down
        try:
            process.wait(timeout=120)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def test_serve_deploy_status_shutdown(head, serve_config):
    path, url = serve_config
    address = ["--address", head["dashboard"]]
    _run(["serve", "deploy", str(path), *address], head["env"])
    deadline = time.monotonic() + 420
    while True:
        status = yaml.safe_load(_run(["serve", "status", *address], head["env"]))
        app = (status.get("applications") or {}).get("polyclip", {})
        if app.get("status") == "RUNNING":
            break
        assert app.get("status") != "DEPLOY_FAILED", status
        assert time.monotonic() < deadline, f"never RUNNING: {status}"
        time.sleep(3)
    assert _get(f"{url}/healthz")[0] == 200
    _run(["serve", "shutdown", *address, "-y"], head["env"])
    status = yaml.safe_load(_run(["serve", "status", *address], head["env"]))
    assert not status.get("applications"), status
