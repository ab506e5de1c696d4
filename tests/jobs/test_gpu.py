"""jobs.gpu on a real multi-node Ray cluster (``ray.cluster_utils.Cluster``) with declared GPUs.

Ray lets a node declare GPUs without hardware (``add_node(num_gpus=1)``), so the decision and
the wait see the same cluster resources a GPU cluster reports. The autoscaler's node types
are published the way an autoscaler does it: a ``ClusterConfig`` sent to the GCS with
``GcsClient.report_cluster_config``; "the autoscaler adds a node" is a node added while
:func:`wait_for_gpus` waits.
"""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path

import pytest

from jobs.config import ScalingSection
from jobs.gpu import GpuDecision, autoscaler_gpu_groups, decide_gpu, resolve_gpu, wait_for_gpus


def _add_node(cluster, attempts: int = 3, **resources):
    """``cluster.add_node``, retried: Ray gives a node 30 s (fixed) to register, which a
    machine shared by many test runs can overrun ("The current node timed out during startup")."""
    for attempt in range(attempts):
        try:
            return cluster.add_node(include_dashboard=False, **resources)
        except Exception as exc:
            if "timed out during startup" not in str(exc) or attempt == attempts - 1:
                raise


@pytest.fixture(scope="module")
def cluster(_ray_session):
    """A head with 1 CPU and no GPU; the tests add GPU nodes. Ours alone, shut down after."""
    import ray
    from ray.cluster_utils import Cluster

    ray.shutdown()  # the session's shared local cluster, if a previous test started one
    c = Cluster(initialize_head=False)
    _add_node(c, num_cpus=1, num_gpus=0)  # the first node is the head
    ray.init(address=c.address, logging_level="WARNING")
    yield c
    ray.shutdown()
    c.shutdown()


def _report_node_types(groups: list[tuple[str, dict[str, int], int]]) -> None:
    """Publish autoscaler node types to the GCS, as an autoscaler that reports its config does."""
    import ray
    from ray._raylet import GcsClient
    from ray.core.generated import autoscaler_pb2

    config = autoscaler_pb2.ClusterConfig()
    for name, resources, max_count in groups:
        group = config.node_group_configs.add(name=name, min_count=0, max_count=max_count)
        group.resources.update(resources)
    GcsClient(address=ray.get_runtime_context().gcs_address).report_cluster_config(config.SerializeToString())


def _requested_bundles() -> list[dict]:
    """The autoscaler's standing request (v1 format: the KV channel request_resources writes)."""
    from ray._private.ray_constants import AUTOSCALER_RESOURCE_REQUEST_CHANNEL
    from ray.experimental.internal_kv import _internal_kv_get

    raw = _internal_kv_get(AUTOSCALER_RESOURCE_REQUEST_CHANNEL)
    return json.loads(raw) if raw else []


def test_false_means_cpu_without_asking_ray():
    decision = decide_gpu(ScalingSection(use_gpu=False), num_workers=4)
    assert decision == GpuDecision(False, "scaling.use_gpu=false")


@pytest.mark.parametrize("bad", ["yes", 1, None])
def test_bad_use_gpu_is_named(bad):
    scaling = ScalingSection.model_construct(use_gpu=bad, gpu_wait_s=1.0, cpus_per_worker=1.0)
    with pytest.raises(ValueError, match=f"got {bad!r}"):
        decide_gpu(scaling, num_workers=1)


def test_bad_counts_are_named():
    with pytest.raises(ValueError, match="got 0"):
        decide_gpu(ScalingSection(use_gpu=False), num_workers=0)
    with pytest.raises(ValueError, match="got 0"):
        wait_for_gpus(0, 1.0)
    with pytest.raises(ValueError, match="got -1"):
        wait_for_gpus(1, -1)


def test_auto_picks_cpu_with_a_reason_when_there_are_no_gpus(cluster):
    assert autoscaler_gpu_groups() is None  # no autoscaler has published node types
    decision = decide_gpu(ScalingSection(use_gpu="auto"), num_workers=1)
    assert not decision.use_gpu and not decision.scale_up
    assert "no GPU" in decision.reason and "publishes no node types" in decision.reason
    assert "scaling.use_gpu=true" in decision.reason  # says how to require them


def test_required_gpus_that_never_come_fail_after_the_configured_wait(cluster):
    scaling = ScalingSection(use_gpu=True, gpu_wait_s=1.5, cpus_per_worker=0.5)
    seen: list[list[dict]] = []
    stop = threading.Event()

    def watch() -> None:  # what the autoscaler is asked for while the job waits
        while not stop.is_set():
            seen.append(_requested_bundles())
            time.sleep(0.2)

    watcher = threading.Thread(target=watch)
    watcher.start()
    start = time.monotonic()
    try:
        with pytest.raises(RuntimeError) as err:
            resolve_gpu(scaling, num_workers=2)
    finally:
        stop.set()
        watcher.join()
    waited = time.monotonic() - start
    assert 1.5 <= waited < 15, waited
    message = str(err.value)
    assert "wants 2 GPUs" in message and "after waiting 1.5s (scaling.gpu_wait_s)" in message
    assert "0 GPUs" in message and "1 alive nodes" in message and "Not training on CPU" in message
    assert [{"GPU": 1, "CPU": 0.5}] * 2 in seen, seen  # two one-GPU worker bundles were requested
    assert _requested_bundles() == []  # and the request is withdrawn: no GPU node kept up for nobody


def test_auto_scales_up_from_zero_when_the_autoscaler_has_gpu_node_types(cluster):
    _report_node_types([("cpu", {"CPU": 8}, 4), ("gpu", {"CPU": 8, "GPU": 1}, 2)])
    try:
        assert [g.name for g in autoscaler_gpu_groups() or []] == ["gpu"]
        too_many = decide_gpu(ScalingSection(use_gpu="auto"), num_workers=3)
        assert not too_many.use_gpu and "at most 2" in too_many.reason

        # The job waits (in a thread); the "autoscaler" adds the GPU node one second into the
        # wait (from the main thread: a Ray node starts only there).
        result: list[GpuDecision | BaseException] = []

        def job() -> None:
            try:
                result.append(resolve_gpu(ScalingSection(use_gpu="auto", gpu_wait_s=60), num_workers=1))
            except BaseException as exc:  # handed to the main thread
                result.append(exc)

        start = time.monotonic()
        waiter = threading.Thread(target=job)
        waiter.start()
        time.sleep(1.0)
        assert waiter.is_alive() and _requested_bundles() == [{"GPU": 1, "CPU": 1.0}]
        _add_node(cluster, num_cpus=1, num_gpus=1)
        waiter.join(timeout=60)
        assert len(result) == 1 and isinstance(result[0], GpuDecision), result
        decision = result[0]
        assert decision.use_gpu and decision.scale_up
        assert "gpu (1 GPU x max 2)" in decision.reason
        assert 1.0 <= time.monotonic() - start < 60
        assert _requested_bundles() == []
    finally:
        _report_node_types([])
    assert not autoscaler_gpu_groups()  # an empty config reads as none published


def _ensure_one_gpu_node(cluster) -> None:
    from jobs.gpu import cluster_gpus

    if cluster_gpus() == 0:  # this test runs alone: add the node the scale-up test adds
        _add_node(cluster, num_cpus=1, num_gpus=1)
    assert cluster_gpus() == 1


def test_auto_picks_gpu_when_a_node_has_gpus(cluster):
    _ensure_one_gpu_node(cluster)
    decision = decide_gpu(ScalingSection(use_gpu="auto"), num_workers=1)
    assert decision.use_gpu and not decision.scale_up
    assert "the cluster has 1 GPUs for 1 workers" in decision.reason
    assert wait_for_gpus(1, 0) == 1  # nothing to wait for


def test_auto_picks_cpu_when_the_gpus_are_too_few_and_cannot_grow(cluster):
    _ensure_one_gpu_node(cluster)
    decision = decide_gpu(ScalingSection(use_gpu="auto"), num_workers=2)
    assert not decision.use_gpu
    assert "1 GPUs, fewer than the 2 workers" in decision.reason


def test_the_choice_is_logged(cluster, caplog):
    _ensure_one_gpu_node(cluster)
    with caplog.at_level("INFO", logger="polyclip"):
        decide_gpu(ScalingSection(use_gpu="auto"), num_workers=1)
    assert any(r.getMessage().startswith("training device: GPU (scaling.use_gpu=auto") for r in caplog.records)


V2_SCRIPT = """
import json, time, ray
for attempt in range(3):  # Ray's fixed 30 s node registration can be overrun on a loaded machine
    try:
        ray.init(address="local", num_cpus=1, include_dashboard=False, logging_level="ERROR")
        break
    except Exception as exc:
        if "timed out during startup" not in str(exc) or attempt == 2:
            raise
from jobs.gpu import wait_for_gpus
start = time.monotonic()
try:
    wait_for_gpus(1, 300, poll_s=0.5)
    print(json.dumps({"raised": None}))
except RuntimeError as exc:
    print(json.dumps({"raised": str(exc), "seconds": time.monotonic() - start}))
ray.shutdown()
"""


@pytest.mark.slow
def test_required_gpus_fail_early_when_the_v2_autoscaler_has_no_node_type_for_them():
    """Ray's v2 autoscaler (KubeRay ``autoscalerOptions.version: v2``) says when no node type
    fits a request; the wait stops there instead of running out its 300 s. A separate
    process: the v2 switch is read when Ray starts."""
    import os
    import subprocess
    import sys

    env = {**os.environ, "RAY_enable_autoscaler_v2": "1", "RAY_AUTH_MODE": "disabled"}
    proc = subprocess.run([sys.executable, "-c", V2_SCRIPT], cwd=Path(__file__).resolve().parents[2], env=env,
                          capture_output=True, text=True, timeout=400)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["raised"], result
    assert "the autoscaler reports that no node type can hold {" in result["raised"], result
    assert "'GPU': 1.0" in result["raised"] and "the cluster has 1 alive nodes, 0 GPUs" in result["raised"]
    assert result["seconds"] < 200, result
