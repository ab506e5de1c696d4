"""Time from ``ray job submit`` to the first training step, on a local token-authenticated head.

Starts its own head with ``cluster/local/up.sh`` on free ports (own state dir, own temp dir,
``POLYCLIP_NUM_CPUS`` CPUs), then ``--repeats`` times submits a one-epoch training job exactly
as a user would::

    ray job submit --address http://127.0.0.1:<port> --no-wait --runtime-env cluster/runtime_env.yaml \\
        -- python -m jobs.train --config jobs/configs/fault_injection.yaml train.epochs=1 ...

with ``RAY_AUTH_MODE=token`` and the head's token file, and reads the job's logs for the
line the rank-0 worker writes just before its first training step (``rank 0 starts training
at epoch 1/1 (unix time T)``). Latency = T - the moment the CLI was started. Also split out:
the CLI's own time, submit -> first log line of the job's driver (upload of the working dir,
job supervisor, Python imports), and the end of the job. The first submission uploads the
working dir and builds the runtime env; later ones hit Ray's cache, so both are reported.
Finally ``cluster/local/down.sh`` stops the head (never ``ray stop``).

Usage::

    python -m jobs.benchmarks.submit_latency [--repeats 3] [--cpus 2]
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from jobs.benchmarks.common import announce, free_port, median, out_dir, summary, write_results
from polyclip.reports.plots import bar_chart

ROOT = Path(__file__).resolve().parents[2]
LOCAL = ROOT / "cluster" / "local"
RAY = Path(sys.executable).parent / "ray"
FIRST_STEP = re.compile(r"rank 0 starts training at epoch \d+/\d+ \(unix time ([0-9.]+)\)")
LOG_TIME = re.compile(r"^(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3}) ", re.MULTILINE)


def head_env(state_dir: Path, cpus: int) -> dict[str, str]:
    """Environment for up.sh/down.sh: spare ports, own state and temp dirs, token auth."""
    ray_port, dash_port = free_port(), free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_AUTH", "RAY_ADDRESS", "RAY_API_SERVER"))}
    env.update(RAY_USAGE_STATS_ENABLED="0", POLYCLIP_STATE_DIR=str(state_dir), POLYCLIP_RAY_PORT=str(ray_port),
               POLYCLIP_DASHBOARD_PORT=str(dash_port), POLYCLIP_NUM_CPUS=str(cpus), POLYCLIP_RAY_AUTH="token",
               POLYCLIP_RAY_TEMP_DIR=f"/tmp/polyclip-ray-bench-{ray_port}", POLYCLIP_STOP_TIMEOUT="15")
    return env


def wait_for_job(client: Any, job_id: str, timeout: float) -> tuple[float | None, str, str]:
    """Poll the job's logs until it ends; return (first-step unix time, final status, logs)."""
    deadline = time.monotonic() + timeout
    first: float | None = None
    while True:
        logs = client.get_job_logs(job_id)
        match = FIRST_STEP.search(logs)
        if match and first is None:
            first = float(match.group(1))
        status = str(client.get_job_status(job_id))
        if status.endswith(("SUCCEEDED", "FAILED", "STOPPED")):
            return first, status.rsplit(".", 1)[-1], client.get_job_logs(job_id)
        if time.monotonic() > deadline:
            client.stop_job(job_id)
            raise TimeoutError(f"job {job_id} still {status} after {timeout:.0f} s")
        time.sleep(0.25)


def first_log_time(logs: str) -> float | None:
    """Unix time of the job driver's first timestamped log line (``jobs.runtime.setup_logging`` format)."""
    match = LOG_TIME.search(logs)
    if match is None:
        return None
    return dt.datetime.strptime(match.group(1), "%Y-%m-%d %H:%M:%S,%f").timestamp()


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--cpus", type=int, default=2, help="CPUs the local head offers")
    parser.add_argument("--config", default="jobs/configs/fault_injection.yaml", help="the job submitted")
    parser.add_argument("--timeout", type=float, default=600.0, help="per job")
    args = parser.parse_args(argv)
    if args.repeats < 1 or args.cpus < 1:
        parser.error("--repeats and --cpus must be >= 1")
    if not (ROOT / args.config).is_file():
        parser.error(f"--config {args.config!r}: no such file under {ROOT}")
    return args


def submit_once(r: int, client: Any, address: str, client_env: dict[str, str], work: Path, out: Path,
                args: argparse.Namespace) -> tuple[dict[str, Any] | None, dict[str, Any] | None]:
    """Submit one job with the CLI and wait for it: its timing row, or (a failed job) its failure."""
    job_id = f"latency-{r}-{int(time.time())}"
    entry = ["python", "-m", "jobs.train", "--config", args.config, f"name=latency-{r}", "train.epochs=1",
             f"run.output_dir={work / 'runs'}", f"run.feature_store={work / 'cache'}"]
    load = os.getloadavg()[0]
    t_submit = time.time()
    cli = subprocess.run([str(RAY), "job", "submit", "--address", address, "--no-wait", "--submission-id",
                          job_id, "--runtime-env", "cluster/runtime_env.yaml", "--", *entry],
                         env=client_env, cwd=ROOT, capture_output=True, text=True, timeout=300)
    t_cli = time.time()
    if cli.returncode != 0:
        raise RuntimeError(f"ray job submit failed:\n{cli.stdout}\n{cli.stderr}")
    first, status, logs = wait_for_job(client, job_id, args.timeout)
    t_end = time.time()
    if status != "SUCCEEDED" or first is None:
        # Recorded and skipped (on a shared machine a job can die of memory pressure), never timed.
        (out / f"{job_id}.log").write_text(logs)
        message = client.get_job_info(job_id).message
        print(f"repeat {r}: job {job_id} ended {status} ({message}); logs in {out / f'{job_id}.log'}", flush=True)
        return None, {"repeat": r, "job": job_id, "status": status, "message": message}
    driver = first_log_time(logs)
    row = {"repeat": r, "job": job_id, "submit_to_first_step_s": first - t_submit, "cli_s": t_cli - t_submit,
           "submit_to_driver_log_s": (driver - t_submit) if driver else float("nan"),
           "driver_to_first_step_s": (first - driver) if driver else float("nan"),
           "submit_to_end_s": t_end - t_submit, "load_1min": load}
    print(f"repeat {r}: first step {row['submit_to_first_step_s']:.2f} s after submit "
          f"(CLI {row['cli_s']:.2f} s, driver up {row['submit_to_driver_log_s']:.2f} s), load {load:.1f}", flush=True)
    return row, None


def on_local_head(args: argparse.Namespace, out: Path) -> tuple[float, list[dict[str, Any]], list[dict[str, Any]]]:
    """Start a local head, submit ``--repeats`` jobs, stop the head; its start-up seconds, the rows, the failures."""
    from ray.job_submission import JobSubmissionClient

    work = Path(tempfile.mkdtemp(prefix="polyclip-submit-latency-"))
    env = head_env(work / "state", args.cpus)
    address = f"http://127.0.0.1:{env['POLYCLIP_DASHBOARD_PORT']}"
    tic = time.perf_counter()
    up = subprocess.run([str(LOCAL / "up.sh")], env=env, capture_output=True, text=True, timeout=300)
    up_seconds = time.perf_counter() - tic
    rows: list[dict[str, Any]] = []
    failures: list[dict[str, Any]] = []
    try:
        if up.returncode != 0:
            raise RuntimeError(f"cluster/local/up.sh failed:\n{up.stdout}\n{up.stderr}")
        token_file = work / "state" / "auth_token"
        client_env = dict(env, RAY_AUTH_MODE="token", RAY_AUTH_TOKEN_PATH=str(token_file))
        client = JobSubmissionClient(address, headers={"Authorization": f"Bearer {token_file.read_text().strip()}"})
        for r in range(args.repeats):
            row, failure = submit_once(r, client, address, client_env, work, out, args)
            rows += [row] if row else []
            failures += [failure] if failure else []
    finally:
        down = subprocess.run([str(LOCAL / "down.sh")], env=env, capture_output=True, text=True, timeout=180)
        if down.returncode != 0:
            print(f"warning: cluster/local/down.sh failed:\n{down.stdout}\n{down.stderr}", file=sys.stderr)
    return up_seconds, rows, failures


def write_report(out: Path, command: str, args: argparse.Namespace, up_seconds: float, rows: list[dict[str, Any]],
                 failures: list[dict[str, Any]]) -> tuple[dict[str, Any], str]:
    """``results.{json,md}`` and ``latency.png``; returns the report and its markdown."""
    latencies = [row["submit_to_first_step_s"] for row in rows]
    extra: dict[str, Any] = {
        "config": args.config, "cpus": args.cpus, "up_seconds": up_seconds,
        "submit_to_first_step_s": summary(latencies),
        "first_submission_s": latencies[0],
        "later_submissions_s": summary(latencies[1:]) if len(latencies) > 1 else None,
        "cli_s": summary([row["cli_s"] for row in rows]),
        "submit_to_driver_log_s": summary([row["submit_to_driver_log_s"] for row in rows]),
        "driver_to_first_step_s": summary([row["driver_to_first_step_s"] for row in rows]),
        "load_1min": summary([row["load_1min"] for row in rows]),
        "failed_submissions": failures,
    }
    later = (f"{median(latencies[1:]):.2f} s (median of {len(latencies) - 1} later submissions, working dir "
             "cached)" if len(latencies) > 1 else "n/a")
    md = write_results(out, command, rows, floatfmt=".2f", extra=extra,
                       title="Time from `ray job submit` to the first training step (local head, token auth)",
                       blocks=[
        f"Local head from `cluster/local/up.sh` ({args.cpus} CPUs, up in {up_seconds:.1f} s), one-epoch "
        f"`{args.config}` job, {args.repeats} sequential submissions; {os.cpu_count()} CPUs shared with other "
        f"jobs (1-min load average: median {extra['load_1min']['median']:.1f}).\n",
        f"Submit -> first training step: median **{median(latencies):.2f} s**; first submission "
        f"{latencies[0]:.2f} s (uploads the working dir), later: {later}.\n", rows,
        f"Failed submissions (not timed): {failures or 'none'}.\n"])
    parts = {"CLI returns": extra["cli_s"]["median"], "driver logs": extra["submit_to_driver_log_s"]["median"],
             "first step": extra["submit_to_first_step_s"]["median"], "job ends": median(
                 [row["submit_to_end_s"] for row in rows])}
    bar_chart(parts, out / "latency.png", "Seconds after `ray job submit` (median)", "seconds")
    return {"command": command, "rows": rows, **extra}, md


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    command = announce(argv, "jobs.benchmarks.submit_latency")
    out = out_dir("submit_latency")
    up_seconds, rows, failures = on_local_head(args, out)
    if not rows:
        raise RuntimeError(f"every submission failed: {failures}")
    report, md = write_report(out, command, args, up_seconds, rows, failures)
    print(md)
    return report


if __name__ == "__main__":
    main()
