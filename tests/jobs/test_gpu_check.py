"""jobs/benchmarks/gpu_check.py end to end on the CPU, at tiny sizes, with Ray made unimportable.

The GPU machine has no Ray: the script runs here in a subprocess whose ``import ray`` fails,
and its JSON summary must hold every check and every measurement.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

# Runs the module as __main__ after making `import ray` fail, as on the GPU machine.
NO_RAY = """
import runpy, sys
class NoRay:
    def find_spec(self, name, path=None, target=None):
        if name == "ray" or name.startswith("ray."):
            raise ImportError(f"{name}: Ray is not installed on the GPU machine")
        return None
sys.meta_path.insert(0, NoRay())
sys.argv = ["gpu_check", *sys.argv[1:]]
runpy.run_module("jobs.benchmarks.gpu_check", run_name="__main__")
"""


def _run(tmp_path: Path, *args: str) -> tuple[subprocess.CompletedProcess[str], dict]:
    out = tmp_path / "out"
    env = {**os.environ, "OUT": str(out), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-c", NO_RAY, *args], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=600)
    summary = json.loads((out / "gpu_check.json").read_text()) if (out / "gpu_check.json").exists() else {}
    return proc, summary


def test_gpu_check_runs_on_cpu_without_ray(tmp_path: Path):
    proc, summary = _run(tmp_path, "--device", "cpu", "--image-size", "32", "--batch", "1", "--mu", "1",
                         "--steps", "1", "--warmup", "0", "--aug-batch", "4", "--threads", "1")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert summary["ok"] is True and summary["device"] == "cpu"
    assert summary["backbone"] == "efficientnet_lite:0"
    assert summary["data"] == ("fashion_mnist" if Path("/usr/share/datasets/fashion-mnist").is_dir() else "synthetic")
    assert summary["command"].startswith("python -m jobs.benchmarks.gpu_check --device cpu")

    collectives = summary["collectives"]
    assert collectives["ok"] and collectives["backend"] == "cpu:gloo,cuda:gloo"
    checks = collectives["checks"]
    assert set(checks) == {"acceptance_meter_on_device", "class_aware_threshold_on_device", "all_reduce_on_device",
                           "off_device_tensor_refused", "cuda_only_backend_refuses_cpu_tensor"}
    assert all(c["ok"] for c in checks.values()), checks
    assert "meta" in checks["off_device_tensor_refused"]["detail"]  # the check's own message, naming the device
    assert "cuda" in checks["cuda_only_backend_refuses_cpu_tensor"]["detail"]

    rows = summary["fixmatch"]
    assert {(r["precision"], r["channels_last"]) for r in rows} == {
        (p, c) for p in ("fp32", "bf16", "fp16") for c in (False, True)}
    for row in rows:
        assert "skipped" not in row, row
        assert row["loss_finite"] and row["images_per_step"] == 2 and row["images_per_s"] > 0, row
        assert row["peak_mem_mb"] is None  # no device memory counter on CPU
    assert rows[-1]["grad_scale"] > 0  # fp16 ran with a GradScaler

    assert [r["precision"] for r in summary["loss_vs_cpu"]] == ["fp32", "bf16", "fp16"]
    assert all(r["ok"] for r in summary["loss_vs_cpu"]), summary["loss_vs_cpu"]
    assert summary["loss_vs_cpu"][0]["rel_diff"] == 0  # fp32 on the CPU is the reference itself
    (augment,) = summary["augment"]
    assert augment["ok"] and augment["weak_images_per_s"] > 0 and augment["strong_images_per_s"] > 0

    methods = {(r["method"], r["precision"]): r for r in summary["methods"]}
    assert {m for m, _ in methods} == {"probe", "finetune_ce", "finetune_ces", "distill", "fixmatch_teacher", "simclr"}
    for (method, precision), row in methods.items():
        if precision == "fp16":  # CPU fp16 autocast is not compared
            assert "GPUs only" in row["skipped"], row
            continue
        assert row["loss_finite"] and row["images_per_s"] > 0, row
        if method in {"probe", "finetune_ce", "finetune_ces", "distill"}:
            assert row["loss_ok"], row  # the first loss matches fp32 on the CPU
            assert precision != "fp32" or row["rel_diff"] == 0

    assert "collectives: backend=cpu:gloo,cuda:gloo, ok=True" in proc.stdout  # one line per measurement


@pytest.mark.parametrize("argv, message", [
    (["--device", "tpu"], "--device 'tpu' is not a device"),
    (["--device", "meta"], "--device 'meta': only cpu and cuda are checked"),
    (["--device", "cpu", "--steps", "0"], "--steps must be at least 1, got 0"),
    (["--device", "cpu", "--batch", "0"], "every --batch >= 1"),
])
def test_gpu_check_names_bad_arguments(argv, message, capsys):
    from jobs.benchmarks.gpu_check import parse_args

    with pytest.raises(SystemExit):
        parse_args(argv)
    assert message in capsys.readouterr().err


def test_gpu_check_defaults_follow_the_device():
    from jobs.benchmarks.gpu_check import parse_args

    args = parse_args(["--device", "cpu"])
    assert (args.image_size, args.batch, args.mu, args.threads) == (48, [2], 1, 1)


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="this machine has CUDA")
def test_gpu_check_refuses_cuda_without_it(capsys):
    from jobs.benchmarks.gpu_check import parse_args

    with pytest.raises(SystemExit):
        parse_args(["--device", "cuda"])
    assert "no CUDA device" in capsys.readouterr().err
