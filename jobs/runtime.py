"""Connecting to Ray, and the runtime_env that ships the project to every worker."""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

import yaml

logger = logging.getLogger("polyclip")

PROJECT_ROOT = Path(__file__).resolve().parent.parent
RUNTIME_ENV_FILE = PROJECT_ROOT / "cluster" / "runtime_env.yaml"


def setup_logging() -> None:
    """Log lines with timestamps (job logs are read in the dashboard and ``ray job logs``)."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("polyclip").setLevel(logging.INFO)


def inside_submitted_job() -> bool:
    """True when this driver was started by ``ray job submit`` (its runtime_env is set already)."""
    return "RAY_JOB_CONFIG_JSON_ENV_VAR" in os.environ


def project_runtime_env() -> dict[str, Any]:
    """The runtime_env of ``cluster/runtime_env.yaml`` with the working dir made absolute."""
    env = yaml.safe_load(RUNTIME_ENV_FILE.read_text())
    env["working_dir"] = str(PROJECT_ROOT)
    return env


def init_ray(address: str | None = None, *, num_cpus: int | None = None) -> None:
    """Connect to a cluster (``address``, ``RAY_ADDRESS``) or start a local one.

    Outside ``ray job submit``, the project is shipped as the working dir so that
    workers import ``jobs`` and ``polyclip`` on any node.
    """
    import ray

    if ray.is_initialized():
        return
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    kwargs: dict[str, Any] = {"logging_level": logging.WARNING, "log_to_driver": True}
    if not inside_submitted_job():
        kwargs["runtime_env"] = project_runtime_env()
    if address is None and "RAY_ADDRESS" not in os.environ:
        kwargs["num_cpus"] = num_cpus
        logger.info("starting a local Ray instance (no address given)")
    ray.init(address=address, **kwargs)
