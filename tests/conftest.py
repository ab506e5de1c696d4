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


def _start_ray(attempts: int = 3):
    """A fresh local Ray instance of the test session's own (``address="local"``: never one a user started).

    Ray waits a fixed 30 s for a new node to register; on a loaded machine that can run
    out, so the start is retried.
    """
    import ray

    from jobs.runtime import project_runtime_env

    for attempt in range(attempts):
        try:
            ray.init(address="local", num_cpus=2, runtime_env=project_runtime_env(), logging_level="WARNING",
                     include_dashboard=False)
            return ray
        except Exception as exc:  # Ray raises a bare Exception for the registration timeout
            if "timed out during startup" not in str(exc) or attempt == attempts - 1:
                raise
            ray.shutdown()
    return ray


@pytest.fixture(scope="session")
def _ray_session():
    yield
    import ray

    ray.shutdown()


@pytest.fixture()
def ray_cluster(_ray_session):
    """A local Ray cluster (2 CPUs) shared by every test that needs one; stopped at the end."""
    import ray

    return ray if ray.is_initialized() else _start_ray()


@pytest.fixture(scope="module")
def fresh_ray_cluster(_ray_session):
    """A Ray cluster of the module's own, for Serve.

    On Ray 2.60 a driver that has run several Train jobs in one session can stop hearing
    about new actors (``serve.start`` then waits forever for its controller), so the Serve
    tests start from a fresh local cluster, and shut it down after them (the next
    ``ray_cluster`` user starts another).
    """
    import ray

    ray.shutdown()
    yield _start_ray()
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
