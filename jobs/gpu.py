"""Whether a job trains on GPUs, and waiting for the autoscaler to bring them.

``scaling.use_gpu`` takes three values:

* ``true``: the job needs ``num_workers`` GPUs. :func:`wait_for_gpus` asks the autoscaler
  for them (``ray.autoscaler.sdk.request_resources``) and waits up to ``scaling.gpu_wait_s``;
  if they do not come (or Ray's v2 autoscaler says no node type fits them), it raises a
  ``RuntimeError`` that names the wait and what the cluster has, instead of letting the job
  train on CPU or sit forever on a pending placement group.
* ``false``: CPU workers.
* ``auto``: :func:`decide_gpu` picks GPUs when the cluster has enough of them now, or when
  the autoscaler's node types can provide them (a node group with GPUs and ``max_count``
  above zero, as published in the GCS cluster config); otherwise CPU, with the reason.

Where ``auto`` cannot see the node types. Ray 2.60's open-source cluster launcher and
KubeRay autoscaler do not publish their node types to the GCS (the cluster config key is
written through ``GcsClient.report_cluster_config``, which only some platforms call), so on
those clusters a GPU group that starts at zero workers is invisible to ``auto``. The
documented commands (``cluster/README.md``, the RayJob entrypoint) therefore pass
``scaling.use_gpu=true``.

Example:
    >>> from jobs.config import ScalingSection
    >>> decision = decide_gpu(ScalingSection(use_gpu=False), num_workers=2)  # doctest: +SKIP
    >>> decision.use_gpu, decision.reason  # doctest: +SKIP
    (False, 'scaling.use_gpu=false')
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass
from typing import Any, Protocol

logger = logging.getLogger("polyclip")

#: How often :func:`wait_for_gpus` looks at the cluster again.
POLL_S = 1.0


class ScalingLike(Protocol):
    """The fields of ``jobs.config.ScalingSection`` that the GPU decision reads."""

    @property
    def use_gpu(self) -> bool | str:
        """True, False or ``"auto"``."""

    @property
    def gpu_wait_s(self) -> float:
        """Seconds to wait for GPUs that must come from the autoscaler."""

    @property
    def cpus_per_worker(self) -> float:
        """CPUs of each Train worker (the CPU part of a requested GPU bundle)."""


@dataclass(frozen=True)
class GpuDecision:
    """Whether a job's Train workers get GPUs, and why.

    Attributes:
        use_gpu: ``ScalingConfig(use_gpu=...)``.
        reason: One line for the job log and the run report.
        scale_up: True when the GPUs are not in the cluster yet and must come from the
            autoscaler (the caller waits for them with :func:`wait_for_gpus`).
    """

    use_gpu: bool
    reason: str
    scale_up: bool = False


@dataclass(frozen=True)
class NodeGroup:
    """One autoscaler node type that has GPUs.

    Attributes:
        name: The node type (``ray.worker.gpu``, the KubeRay group name...).
        gpus_per_node: GPUs each node of the group offers.
        max_count: Most nodes of the group the autoscaler may run (-1: no limit).
    """

    name: str
    gpus_per_node: float
    max_count: int

    @property
    def max_gpus(self) -> float:
        """GPUs the group can provide at most (``inf`` without a limit)."""
        return math.inf if self.max_count < 0 else self.gpus_per_node * self.max_count


def cluster_gpus() -> float:
    """GPUs in the running cluster now (``ray.cluster_resources()``, alive nodes only)."""
    import ray

    return float(ray.cluster_resources().get("GPU", 0.0))


def autoscaler_gpu_groups() -> list[NodeGroup] | None:
    """Node types with GPUs that the autoscaler may start, from the GCS cluster config.

    This is the cluster config an autoscaler publishes in the GCS (``ClusterConfig.
    node_group_configs``: resources, ``min_count``, ``max_count`` per node type); Ray Data's
    autoscaler reads it the same way (``ray._private.state.state.get_cluster_config``).

    Returns:
        The groups with at least one GPU per node and a ``max_count`` other than zero, or
        None when no autoscaler has published a config (a fixed-size cluster, or Ray 2.60's
        open-source launcher and KubeRay, which do not publish one).
    """
    import ray._private.state

    try:
        config = ray._private.state.state.get_cluster_config()
    except Exception as exc:  # an older/newer GCS without the key: treat as unknown
        logger.debug("could not read the autoscaler's cluster config: %s", exc)
        return None
    if config is None:
        return None
    groups = []
    for group in config.node_group_configs:
        gpus = float(group.resources.get("GPU", 0))
        if gpus > 0 and group.max_count != 0:
            groups.append(NodeGroup(name=group.name, gpus_per_node=gpus, max_count=int(group.max_count)))
    return groups


def _fmt(count: float) -> str:
    return "no limit" if math.isinf(count) else f"{count:g}"


def decide_gpu(scaling: ScalingLike, *, num_workers: int) -> GpuDecision:
    """Decide ``ScalingConfig(use_gpu=...)`` for a job, and log the choice and its reason.

    Args:
        scaling: The job's ``scaling`` section (``use_gpu``: True, False or ``"auto"``).
        num_workers: Train workers; each one takes one GPU.

    Returns:
        The decision. With ``use_gpu=true`` it is always GPUs (``scale_up`` when the cluster
        has fewer than ``num_workers`` now); with ``auto``, GPUs when the cluster has at
        least ``num_workers`` of them now or its autoscaler node types can provide them.

    Raises:
        ValueError: ``use_gpu`` is not True, False or ``"auto"``, or ``num_workers < 1``.
    """
    if num_workers < 1:
        raise ValueError(f"num_workers must be at least 1, got {num_workers!r}")
    mode = scaling.use_gpu
    if mode is False:
        decision = GpuDecision(False, "scaling.use_gpu=false")
    elif mode is True:
        have = cluster_gpus()
        if have >= num_workers:
            decision = GpuDecision(True, f"scaling.use_gpu=true; the cluster has {have:g} GPUs for {num_workers} "
                                         "workers")
        else:
            decision = GpuDecision(True, f"scaling.use_gpu=true; the cluster has {have:g} GPUs, {num_workers} "
                                         "workers need one each: asking the autoscaler", scale_up=True)
    elif mode == "auto":
        decision = _decide_auto(num_workers)
    else:
        raise ValueError(f"scaling.use_gpu must be true, false or 'auto', got {mode!r}")
    logger.info("training device: %s (%s)", "GPU" if decision.use_gpu else "CPU", decision.reason)
    return decision


def _decide_auto(num_workers: int) -> GpuDecision:
    have = cluster_gpus()
    if have >= num_workers:
        return GpuDecision(True, f"scaling.use_gpu=auto; the cluster has {have:g} GPUs for {num_workers} workers")
    groups = autoscaler_gpu_groups()
    if groups:
        can = max(have, sum(g.max_gpus for g in groups))
        named = ", ".join(f"{g.name} ({g.gpus_per_node:g} GPU x max {_fmt(g.max_count)})" for g in groups)
        if can >= num_workers:
            return GpuDecision(True, f"scaling.use_gpu=auto; the cluster has {have:g} GPUs now and the autoscaler "
                                     f"can add GPU nodes: {named}", scale_up=have < num_workers)
        return GpuDecision(False, f"scaling.use_gpu=auto; {num_workers} workers need {num_workers} GPUs but the "
                                  f"cluster has {have:g} and its autoscaler at most {_fmt(can)} ({named})")
    if have > 0:
        return GpuDecision(False, f"scaling.use_gpu=auto; the cluster has {have:g} GPUs, fewer than the "
                                  f"{num_workers} workers, and no autoscaler node type with GPUs")
    seen = "reports no node type with GPUs" if groups is not None else "publishes no node types"
    return GpuDecision(False, f"scaling.use_gpu=auto; the cluster has no GPU and its autoscaler {seen} "
                              "(set scaling.use_gpu=true to scale a GPU group up from zero)")


def infeasible_gpu_bundles() -> list[dict[str, float]]:
    """GPU bundles that the autoscaler says no node type can ever hold.

    Read from the autoscaling state that Ray's v2 autoscaler reports to the GCS
    (``infeasible_cluster_resource_constraints``: requests of ``request_resources`` that no
    node type fits). The v1 autoscaler reports none, so this is empty there and the wait
    runs to its end.

    Returns:
        The infeasible bundles that ask for GPUs (empty when none, or when unknown).
    """
    import ray
    from ray._raylet import GcsClient  # type: ignore[attr-defined]
    from ray.core.generated.autoscaler_pb2 import GetClusterStatusReply  # type: ignore[attr-defined]

    try:
        raw = GcsClient(address=ray.get_runtime_context().gcs_address).get_cluster_status(timeout_s=5)
        reply = GetClusterStatusReply.FromString(raw)
    except Exception as exc:  # no autoscaler state (yet): nothing known to be infeasible
        logger.debug("could not read the autoscaling state: %s", exc)
        return []
    bundles = []
    for constraint in reply.autoscaling_state.infeasible_cluster_resource_constraints:
        for request in constraint.resource_requests:
            bundle = dict(request.request.resources_bundle)
            if bundle.get("GPU", 0) > 0:
                bundles.append(bundle)
    return bundles


def _describe_cluster() -> str:
    import ray

    nodes = [n for n in ray.nodes() if n.get("Alive")]
    totals = ray.cluster_resources()
    return (f"{len(nodes)} alive nodes, {totals.get('GPU', 0):g} GPUs, {totals.get('CPU', 0):g} CPUs "
            f"(resources: {', '.join(f'{k}={v:g}' for k, v in sorted(totals.items()) if not _internal(k))})")


def _internal(resource: str) -> bool:
    # Ray adds per-node and memory resources that say nothing about GPUs.
    return resource.startswith(("node:", "accelerator_type:")) or resource in {"memory", "object_store_memory"}


def wait_for_gpus(count: int, timeout_s: float, *, cpus_per_gpu: float = 1.0, poll_s: float = POLL_S) -> float:
    """Ask the autoscaler for ``count`` one-GPU bundles and wait until the cluster has them.

    The request (``request_resources(bundles=[{"GPU": 1, "CPU": cpus_per_gpu}] * count)``)
    is withdrawn when this returns or raises: it is a cluster-wide setting that would keep
    GPU nodes up after the job; the Train workers' own placement group holds the nodes
    from then on (the autoscaler's idle timeout is minutes, the workers start in seconds).

    Args:
        count: GPUs the job needs (one per Train worker).
        timeout_s: How long to wait (``scaling.gpu_wait_s``); 0 checks once.
        cpus_per_gpu: CPUs in each requested bundle (``scaling.cpus_per_worker``), so the
            autoscaler picks a node type that fits a whole worker.
        poll_s: Seconds between looks at the cluster.

    Returns:
        The GPUs the cluster has when the wait ends.

    Raises:
        ValueError: ``count < 1``, or a negative ``timeout_s`` / ``cpus_per_gpu``.
        RuntimeError: The GPUs did not come within ``timeout_s``, or the autoscaler said
            earlier that no node type can hold them; the message names the wait and what
            the cluster has.
    """
    if count < 1:
        raise ValueError(f"count must be at least 1 GPU, got {count!r}")
    if timeout_s < 0:
        raise ValueError(f"timeout_s must be >= 0, got {timeout_s!r}")
    if cpus_per_gpu < 0:
        raise ValueError(f"cpus_per_gpu must be >= 0, got {cpus_per_gpu!r}")
    have = cluster_gpus()
    if have >= count:
        return have
    from ray.autoscaler.sdk import request_resources

    bundle: dict[str, Any] = {"GPU": 1}
    if cpus_per_gpu > 0:
        bundle["CPU"] = cpus_per_gpu
    logger.info("waiting up to %gs for %d GPUs (the cluster has %g): asking the autoscaler for %d x %s",
                timeout_s, count, have, count, bundle)
    start = time.monotonic()
    request_resources(bundles=[dict(bundle) for _ in range(count)])
    infeasible: list[dict[str, float]] = []
    try:
        while True:
            have = cluster_gpus()
            if have >= count:
                logger.info("%g GPUs after %.1fs", have, time.monotonic() - start)
                return have
            infeasible = infeasible_gpu_bundles()
            left = timeout_s - (time.monotonic() - start)
            if infeasible or left <= 0:
                break
            time.sleep(min(poll_s, left))
    finally:
        request_resources(bundles=[])
    waited = time.monotonic() - start
    why = (f"after {waited:.0f}s of scaling.gpu_wait_s={timeout_s:g}s the autoscaler reports that no node type "
           f"can hold {infeasible[0]}, and" if infeasible
           else f"after waiting {timeout_s:g}s (scaling.gpu_wait_s)")
    raise RuntimeError(
        f"scaling.use_gpu wants {count} GPUs, but {why} the cluster has {_describe_cluster()}. Not training on "
        "CPU: add GPU nodes (an autoscaler node type with GPUs and max_workers > 0), raise scaling.gpu_wait_s, "
        "or set scaling.use_gpu=false.")


def resolve_gpu(scaling: ScalingLike, *, num_workers: int) -> GpuDecision:
    """:func:`decide_gpu`, then :func:`wait_for_gpus` when the GPUs must come from the autoscaler.

    Args:
        scaling: The job's ``scaling`` section (``use_gpu``, ``gpu_wait_s``, ``cpus_per_worker``).
        num_workers: Train workers (one GPU each).

    Returns:
        The decision, after the GPUs are in the cluster when it says ``use_gpu``.

    Raises:
        RuntimeError: GPUs were required (or chosen by ``auto``) and did not come within
            ``scaling.gpu_wait_s``.
    """
    decision = decide_gpu(scaling, num_workers=num_workers)
    if decision.use_gpu and decision.scale_up:
        wait_for_gpus(num_workers, scaling.gpu_wait_s, cpus_per_gpu=scaling.cpus_per_worker)
    return decision
