"""Shared fixtures. Offline, deterministic; one local Ray cluster per test session."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

# Before anything imports Ray or a hub client.
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

PROJECT_ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="session")
def ray_cluster():
    """A local Ray cluster (2 CPUs) shared by every test that needs one; stopped at the end."""
    import ray

    from jobs.runtime import project_runtime_env

    if not ray.is_initialized():
        ray.init(num_cpus=2, runtime_env=project_runtime_env(), logging_level="WARNING",
                 include_dashboard=False)
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def fashion_mnist():
    """The real Fashion-MNIST (Debian package or ./data); skipped only if absent on this machine."""
    from polyclip.data.datasets import DatasetError, load_dataset

    try:
        return load_dataset("fashion_mnist")
    except DatasetError as exc:  # pragma: no cover - `make test` installs it
        pytest.fail(f"Fashion-MNIST is missing; run `make data`: {exc}")


@pytest.fixture()
def rng() -> np.random.Generator:
    return np.random.default_rng(0)
