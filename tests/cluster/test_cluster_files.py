"""Static checks of cluster/: every YAML parses, has the fields its tool needs, and agrees
with the pins in pyproject.toml; the shell scripts are valid bash."""

from __future__ import annotations

import contextlib
import json
import os
import re
import shlex
import subprocess
import tomllib
from pathlib import Path
from typing import Any

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
CLUSTER = ROOT / "cluster"
K8S = CLUSTER / "kubernetes"
LAUNCHER = CLUSTER / "cloud" / "gpu-cluster.yaml"

PIN_RE = re.compile(r"^([A-Za-z0-9][A-Za-z0-9._-]*)(\[[^\]]*\])?==([^\s;\"',]+)$")


def _norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _pins() -> dict[str, str]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    deps = list(project["dependencies"])
    for extra in project.get("optional-dependencies", {}).values():
        deps += extra
    pins = {}
    for dep in deps:
        if re.fullmatch(rf"{re.escape(project['name'])}\[[^\]]*\]", dep.strip()):
            continue  # an extra made of other extras (``polyclip[serve,language]``)
        m = PIN_RE.match(dep.strip())
        assert m, f"pyproject dependency is not an exact pin: {dep!r}"
        pins[_norm(m.group(1))] = m.group(3)
    return pins


PINS = _pins()
RAY_VERSION = PINS["ray"]
PY_TAG = "py" + re.sub(r"\D", "", tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["requires-python"]
                       .split(",")[0])[:3]  # ">=3.11" -> "py311"


def _yaml_files() -> list[Path]:
    return sorted(CLUSTER.rglob("*.yaml")) + sorted(CLUSTER.rglob("*.yml"))


def _docs(path: Path) -> list[Any]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d is not None]


def _k8s_docs(kind: str) -> list[dict]:
    found = [d for p in sorted(K8S.glob("*.yaml")) for d in _docs(p) if isinstance(d, dict) and d.get("kind") == kind]
    assert found, f"no {kind} in {K8S}"
    return found


def _strings(obj: Any) -> list[str]:
    """Every string inside a parsed YAML document (embedded YAML strings included)."""
    out: list[str] = []
    if isinstance(obj, str):
        out.append(obj)
        if "\n" in obj:
            with contextlib.suppress(yaml.YAMLError):
                out += _strings(yaml.safe_load(obj))
    elif isinstance(obj, dict):
        for k, v in obj.items():
            out += _strings(k) + _strings(v)
    elif isinstance(obj, list):
        for v in obj:
            out += _strings(v)
    return out


def _cluster_spec_of(doc: dict) -> dict:
    spec = doc["spec"]
    return {"RayCluster": lambda: spec, "RayJob": lambda: spec["rayClusterSpec"],
            "RayService": lambda: spec["rayClusterConfig"]}[doc["kind"]]()


# ------------------------------------------------------------------ every file


def test_expected_files_exist():
    for rel in ["local/up.sh", "local/down.sh", "local/common.sh", "cloud/gpu-cluster.yaml",
                "kubernetes/raycluster.yaml", "kubernetes/rayjob.yaml", "kubernetes/rayservice.yaml",
                "kubernetes/runs-volume.yaml", "runtime_env.yaml", "README.md"]:
        assert (CLUSTER / rel).is_file(), rel


@pytest.mark.parametrize("path", _yaml_files(), ids=lambda p: str(p.relative_to(ROOT)))
def test_yaml_parses(path: Path):
    docs = _docs(path)
    assert docs and all(isinstance(d, dict) for d in docs)


@pytest.mark.parametrize("script", sorted(CLUSTER.rglob("*.sh")), ids=lambda p: str(p.relative_to(ROOT)))
def test_shell_scripts_are_valid_bash(script: Path):
    subprocess.run(["bash", "-n", str(script)], check=True)


def test_entry_scripts_are_executable():
    for name in ["up.sh", "down.sh"]:
        path = CLUSTER / "local" / name
        assert path.stat().st_mode & 0o111, f"{path} is not executable"
        assert path.read_text().startswith("#!/usr/bin/env bash")


def test_down_never_runs_plain_ray_stop():
    for name in ["up.sh", "down.sh", "common.sh"]:
        code = [ln for ln in (CLUSTER / "local" / name).read_text().splitlines() if not ln.lstrip().startswith("#")]
        assert not any(re.search(r"\bray\"?\s+stop\b|RAY_BIN\"?\s+stop", ln) for ln in code), name


# ------------------------------------------------------------------ pins


def test_image_tags_match_the_ray_pin():
    images = []
    for path in _yaml_files():
        for s in _strings(_docs(path)):
            images += re.findall(r"rayproject/ray(?:-ml)?:[\w.\-]+", s)
    assert images, "no rayproject images referenced"
    for image in images:
        tag = image.split(":", 1)[1]
        assert tag.startswith(f"{RAY_VERSION}-{PY_TAG}"), f"{image}: expected {RAY_VERSION}-{PY_TAG}[-gpu]"
        assert tag in {f"{RAY_VERSION}-{PY_TAG}", f"{RAY_VERSION}-{PY_TAG}-gpu"}, image


def _pip_requirements() -> list[tuple[str, str]]:
    """(file, requirement) for every requirement named in a `pip install` or a runtime_env `pip`."""
    reqs: list[tuple[str, str]] = []
    for path in _yaml_files() + sorted(CLUSTER.rglob("*.sh")) + [CLUSTER / "README.md"]:
        text = path.read_text()
        for cmd in re.findall(r"pip3? install[^\n`]*", text):
            for tok in re.findall(r"[^\s\"'\\]+", cmd)[2:]:
                if not tok.startswith("-") and "==" in tok:
                    reqs.append((path.name, tok))
        if path.suffix == ".yaml":
            for doc in _docs(path):
                for env in _runtime_envs(doc):
                    pip = env.get("pip")
                    if isinstance(pip, dict):
                        pip = pip.get("packages")
                    if isinstance(pip, list):
                        reqs += [(path.name, r) for r in pip]
    return reqs


def _runtime_envs(doc: Any) -> list[dict]:
    envs = []
    if isinstance(doc, dict):
        if "working_dir" in doc or "pip" in doc or "py_modules" in doc:
            envs.append(doc)
        for key, value in doc.items():
            if key in {"runtimeEnvYAML", "serveConfigV2"} and isinstance(value, str):
                envs += _runtime_envs(yaml.safe_load(value))
            else:
                envs += _runtime_envs(value)
    elif isinstance(doc, list):
        for v in doc:
            envs += _runtime_envs(v)
    return envs


def test_every_pip_pin_agrees_with_pyproject():
    reqs = _pip_requirements()
    assert reqs, "no pip requirements found in cluster/"
    for where, req in reqs:
        req = req.strip()
        if req.startswith("polyclip @ "):  # the project itself, from its own pyproject
            assert req.split(" @ ", 1)[1].startswith("https://"), (where, req)
            continue
        m = PIN_RE.match(req)
        assert m, f"{where}: {req!r} is not an exact pin"
        name, version = _norm(m.group(1)), m.group(3)
        assert name in PINS, f"{where}: {name} is not a dependency in pyproject.toml"
        assert version == PINS[name], f"{where}: {name}=={version} but pyproject pins {PINS[name]}"


# ------------------------------------------------------------------ cluster launcher


def test_launcher_config_has_required_fields():
    cfg = _docs(LAUNCHER)[0]
    for key in ["cluster_name", "provider", "available_node_types", "head_node_type",
                "setup_commands", "head_start_ray_commands", "worker_start_ray_commands", "file_mounts"]:
        assert cfg.get(key), key
    assert cfg["provider"]["type"] == "aws"
    types = cfg["available_node_types"]
    assert cfg["head_node_type"] in types
    head = types[cfg["head_node_type"]]
    assert head.get("resources", {}).get("GPU", 0) == 0, "the head is a CPU node"
    gpu_types = {n: t for n, t in types.items() if t.get("resources", {}).get("GPU", 0) >= 1}
    assert gpu_types, "no GPU worker type"
    for name, t in gpu_types.items():
        assert t["min_workers"] == 0 and t["max_workers"] >= 1, name
    assert any("--head" in c and "--dashboard-port" in c for c in cfg["head_start_ray_commands"])
    assert all("RAY_AUTH_MODE=token" in c for c in cfg["head_start_ray_commands"] + cfg["worker_start_ray_commands"]
               if "ray start" in c)
    setup = "\n".join(cfg["setup_commands"])
    assert "requirements.lock" in setup and "-e ~/polyclip" in setup
    assert cfg["file_mounts"].get("~/polyclip") == "."
    for d in [".venv", "data", "runs"]:
        assert d in cfg["rsync_exclude"], d


def test_launcher_config_passes_rays_own_validation():
    from ray.autoscaler._private.util import prepare_config, validate_config

    validate_config(prepare_config(_docs(LAUNCHER)[0]))


# ------------------------------------------------------------------ KubeRay


@pytest.mark.parametrize("kind", ["RayCluster", "RayJob", "RayService"])
def test_kuberay_resources(kind: str):
    for doc in _k8s_docs(kind):
        assert doc["apiVersion"] == "ray.io/v1"
        assert doc["metadata"]["name"]
        spec = _cluster_spec_of(doc)
        assert spec["rayVersion"] == RAY_VERSION
        assert spec.get("authOptions", {}).get("mode") == "token", "token authentication must be on"
        head = spec["headGroupSpec"]["template"]["spec"]["containers"][0]
        assert head["image"] == f"rayproject/ray:{RAY_VERSION}-{PY_TAG}"
        groups = spec["workerGroupSpecs"]
        assert groups
        gpu_groups = [g for g in groups
                      if int(g["template"]["spec"]["containers"][0]["resources"]["limits"]
                             .get("nvidia.com/gpu", 0)) >= 1]
        assert gpu_groups, "no GPU worker group"
        for g in gpu_groups:
            c = g["template"]["spec"]["containers"][0]
            assert c["image"] == f"rayproject/ray:{RAY_VERSION}-{PY_TAG}-gpu"
            assert g["minReplicas"] <= g["maxReplicas"]


def test_rayjob_runs_jobs_train_on_an_existing_config():
    for doc in _k8s_docs("RayJob"):
        argv = shlex.split(doc["spec"]["entrypoint"])
        assert argv[:3] == ["python", "-m", "jobs.train"], argv
        config = argv[argv.index("--config") + 1]
        assert (ROOT / config).is_file(), f"RayJob config {config} does not exist"
        env = yaml.safe_load(doc["spec"]["runtimeEnvYAML"])
        assert env["working_dir"]


def test_rayservice_serves_the_app():
    for doc in _k8s_docs("RayService"):
        serve = yaml.safe_load(doc["spec"]["serveConfigV2"])
        apps = serve["applications"]
        assert any(a["import_path"] == "serve.app:build_app" and "artifact" in a.get("args", {}) for a in apps)
        from ray.serve.schema import ServeDeploySchema

        ServeDeploySchema.model_validate(serve)


# ------------------------------------------------------------------ runtime_env


@pytest.mark.parametrize("path", [CLUSTER / "runtime_env.yaml", K8S / "runtime_env.yaml"],
                         ids=lambda p: str(p.relative_to(ROOT)))
def test_runtime_env_excludes_data_venv_and_outputs(path: Path):
    env = _docs(path)[0]
    assert env["working_dir"] == "."
    excludes = {e.rstrip("/") for e in env["excludes"]}
    for required in [".venv", "data", "runs", ".cache", ".git", ".ray-local", "**/__pycache__", "*.npy"]:
        assert required in excludes, f"{path.name} does not exclude {required}"


def test_runtime_env_is_accepted_by_ray():
    from ray.runtime_env import RuntimeEnv

    env = _docs(CLUSTER / "runtime_env.yaml")[0]
    RuntimeEnv(**env)
    json.dumps(env)


def test_runtime_env_upload_is_small():
    """What `--runtime-env cluster/runtime_env.yaml` would upload from this checkout stays small."""
    from ray._private.runtime_env.packaging import _dir_travel, _get_excludes

    env = _docs(CLUSTER / "runtime_env.yaml")[0]
    files: list[Path] = []
    _dir_travel(ROOT, [_get_excludes(ROOT, env["excludes"])], lambda p: files.append(p) if p.is_file() else None,
                include_gitignore=True)
    rel = {str(p.relative_to(ROOT)) for p in files}
    assert any(r.startswith("jobs/") for r in rel) and any(r.startswith("library/polyclip/") for r in rel)
    assert not any(r.startswith((".venv/", "data/", "runs/", ".git/")) for r in rel)
    assert sum(p.stat().st_size for p in files) < 50 * 1024 * 1024


# ------------------------------------------------------------------ GPUs


def _continued_lines(text: str, comment: bool = False) -> list[str]:
    """Lines with backslash continuations joined (``#`` comment markers stripped first)."""
    lines = []
    for line in text.splitlines():
        if comment:
            if not line.lstrip().startswith("#"):
                continue
            line = line.lstrip()[1:]
        lines.append(line)
    joined, current = [], ""
    for line in lines:
        if line.rstrip().endswith("\\"):
            current += line.rstrip()[:-1] + " "
        else:
            joined.append(current + line)
            current = ""
    return joined


def _train_argv(line: str) -> list[str] | None:
    """``python -m jobs.train ...`` of a shell line (None if it has none), without comments."""
    if "python -m jobs.train" not in line:
        return None
    argv = shlex.split(line[line.index("python -m jobs.train"):], comments=True)
    return argv


def _readme_sections() -> dict[str, str]:
    """Second-level sections of cluster/README.md: heading -> body."""
    parts = re.split(r"^## (.+)$", (CLUSTER / "README.md").read_text(), flags=re.M)
    return dict(zip(parts[1::2], parts[2::2]))


def _code_lines(markdown: str) -> list[str]:
    blocks = re.findall(r"```(?:bash|sh)?\n(.*?)```", markdown, flags=re.S)
    return [ln for block in blocks for ln in _continued_lines(block)]


def _gpu_cluster_commands() -> list[tuple[str, list[str]]]:
    """(where, argv) of every documented ``jobs.train`` command aimed at a cluster with GPU groups."""
    found: list[tuple[str, list[str]]] = []
    for heading, body in _readme_sections().items():
        if heading.startswith(("AWS", "Kubernetes", "GPUs")):
            found += [(f"README: {heading}", a) for a in map(_train_argv, _code_lines(body)) if a]
    for path in [LAUNCHER, K8S / "raycluster.yaml"]:
        found += [(path.name, a) for a in map(_train_argv, _continued_lines(path.read_text(), comment=True)) if a]
    for doc in _k8s_docs("RayJob"):
        found.append((f"RayJob {doc['metadata']['name']}", shlex.split(doc["spec"]["entrypoint"])))
    return found


def test_gpu_groups_start_at_zero_and_declare_their_gpus():
    """Every GPU group scales from zero (no idle GPU bill) and says how many GPUs a node has."""
    cfg = _docs(LAUNCHER)[0]
    for name, t in cfg["available_node_types"].items():
        if t.get("resources", {}).get("GPU", 0):
            assert t["min_workers"] == 0 and t["max_workers"] >= 1, name
            assert t["resources"]["GPU"] >= 1 and t["resources"]["CPU"] >= 1, name
            assert t["node_config"]["InstanceType"].startswith(("g", "p")), f"{name}: not a GPU instance type"
    for kind in ["RayCluster", "RayJob"]:
        for doc in _k8s_docs(kind):
            for g in _cluster_spec_of(doc)["workerGroupSpecs"]:
                res = g["template"]["spec"]["containers"][0]["resources"]
                gpus = int(res["limits"].get("nvidia.com/gpu", 0))
                if not gpus:
                    continue
                where = f"{kind} {doc['metadata']['name']} group {g['groupName']}"
                assert g["minReplicas"] == 0 and g.get("replicas", 0) == 0 and g["maxReplicas"] >= 1, where
                assert int(res["requests"]["nvidia.com/gpu"]) == gpus, f"{where}: GPU request != limit"
                assert int(g["rayStartParams"]["num-gpus"]) == gpus, f"{where}: num-gpus != nvidia.com/gpu"
                tolerations = g["template"]["spec"].get("tolerations", [])
                assert any(t["key"] == "nvidia.com/gpu" for t in tolerations), f"{where}: no GPU-node toleration"


def test_documented_gpu_cluster_commands_require_gpus():
    """A GPU group that starts at zero is invisible to ``use_gpu: auto`` on Ray 2.60's launcher and
    KubeRay (they publish no node types), so every documented command for those clusters
    sets ``scaling.use_gpu=true`` and a wait long enough for a cold node; each parses."""
    from jobs.config import load_config

    commands = _gpu_cluster_commands()
    wheres = {w for w, _ in commands}
    assert {"gpu-cluster.yaml", "raycluster.yaml", "RayJob polyclip-demo", "README: AWS (Ray cluster launcher)",
            "README: Kubernetes (KubeRay)"} <= wheres, wheres
    for where, argv in commands:
        assert argv[:3] == ["python", "-m", "jobs.train"], (where, argv)
        config = argv[argv.index("--config") + 1]
        overrides = [a for a in argv[3:] if "=" in a and not a.startswith("-")]
        overrides = [o if "<bucket>" not in o else o.replace("<bucket>", "bucket") for o in overrides]
        cfg = load_config(ROOT / config, overrides)
        assert cfg.scaling.use_gpu is True, f"{where}: {shlex.join(argv)} does not set scaling.use_gpu=true"
        assert cfg.scaling.gpu_wait_s >= 900, f"{where}: a cold GPU node needs more than {cfg.scaling.gpu_wait_s}s"


def test_local_commands_leave_the_device_to_auto():
    """The local head has no GPU group: its commands keep ``auto`` (or say false)."""
    from jobs.config import load_config

    body = _readme_sections()["Local head (this machine)"]
    argvs = [a for a in map(_train_argv, _code_lines(body)) if a]
    assert argvs
    for argv in argvs:
        overrides = [a for a in argv[3:] if "=" in a]
        assert load_config(ROOT / argv[argv.index("--config") + 1], overrides).scaling.use_gpu in ("auto", False)


def test_readme_documents_gpus():
    section = _readme_sections().get("GPUs")
    assert section, "cluster/README.md has no '## GPUs' section"
    for needle in ["scaling.use_gpu", "auto", "scaling.gpu_wait_s", "train.precision", "bf16", "fp16",
                   "GradScaler", "train.channels_last", "jobs/benchmarks/gpu_check.py", "jobs/gpu.py"]:
        assert needle in section, needle
    assert re.search(r"no GPU run", section, flags=re.I), "the README must say no GPU run has happened yet"


def _up(tmp_path: Path, **env: str) -> subprocess.CompletedProcess[str]:
    state = tmp_path / "state"
    full = {**os.environ, "POLYCLIP_STATE_DIR": str(state), "POLYCLIP_RAY_PORT": "1", "PATH":
            f"{ROOT / '.venv' / 'bin'}:{os.environ['PATH']}", **env}
    return subprocess.run(["bash", str(CLUSTER / "local" / "up.sh")], env=full, capture_output=True, text=True,
                          timeout=60, cwd=ROOT)


def test_up_refuses_an_open_dashboard_without_auth(tmp_path: Path):
    proc = _up(tmp_path, POLYCLIP_DASHBOARD_HOST="0.0.0.0", POLYCLIP_RAY_AUTH="disabled")
    assert proc.returncode != 0
    assert "POLYCLIP_DASHBOARD_HOST=0.0.0.0 is not loopback and POLYCLIP_RAY_AUTH=disabled" in proc.stderr + proc.stdout


def test_up_refuses_a_temp_dir_it_does_not_own_or_a_symlink(tmp_path: Path):
    target = tmp_path / "elsewhere"
    target.mkdir()
    link = tmp_path / "ray-tmp"
    link.symlink_to(target)
    proc = _up(tmp_path, POLYCLIP_RAY_TEMP_DIR=str(link))
    assert proc.returncode != 0 and "is a symlink; refusing it" in proc.stderr + proc.stdout
