"""Serve tests start their own local cluster, retrying a start that the shared machine made slow."""

from __future__ import annotations

import time

import pytest

from tests.conftest import _start_ray

#: Starts tried before giving up: on a loaded 2-core machine Ray's raylet sometimes gives up
#: waiting for its agent (a fixed 30 s) although nothing is wrong with the test.
START_ATTEMPTS = 4


@pytest.fixture(scope="module")
def fresh_ray_cluster(_ray_session):
    """As ``tests.conftest.fresh_ray_cluster``, retrying a local start that timed out."""
    import ray

    ray.shutdown()
    for attempt in range(1, START_ATTEMPTS + 1):
        try:
            started = _start_ray()
            break
        except Exception as exc:  # Ray raises a bare Exception for "timed out during startup"
            ray.shutdown()
            if attempt == START_ATTEMPTS or "timed out during startup" not in str(exc):
                raise
            time.sleep(5 * attempt)
    yield started
    ray.shutdown()
