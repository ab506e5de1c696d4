"""Device-checked collectives: NCCL's device rule reproduced on a CPU box, and the library routed through it.

``init_process_group("cuda:gloo")`` registers a backend for CUDA tensors only, as NCCL
does; on this CPU machine any CPU-tensor collective then fails exactly as it would on a GPU
cluster. Workers are spawned (never forked: the test process may hold a Ray driver) with a
file rendezvous (no port to race for) and report through files.
"""

import json
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from polyclip.distributed import (
    CollectiveDeviceError,
    all_gather,
    all_reduce,
    backend_device_types,
    check_devices,
    on_training_device,
    training_device,
)
from polyclip.losses.ntxent import NTXentLoss
from polyclip.methods.class_aware_threshold import ClassAwareThreshold
from polyclip.methods.pseudo_label import AcceptanceMeter


def test_without_a_process_group_collectives_only_check():
    t = torch.arange(3.0)
    assert all_reduce(t) is t and torch.equal(t, torch.arange(3.0))
    assert all_gather(t)[0] is t
    assert backend_device_types() == frozenset()
    with pytest.raises(CollectiveDeviceError, match=r"all_reduce: tensor 0 \(3,\) is on cpu, but the training "
                                                    r"device is meta"):
        all_reduce(t, expected=torch.device("meta"))


def test_declared_training_device_is_the_default_expectation():
    assert training_device() is None
    with on_training_device("meta"):
        assert training_device() == torch.device("meta")
        with pytest.raises(CollectiveDeviceError, match="training device is meta"):
            all_reduce(torch.ones(2))
        all_reduce(torch.ones(2), expected=torch.device("cpu"))  # an explicit expectation wins
    assert training_device() is None


def test_device_index_matters_only_when_both_name_one():
    t = torch.ones(1, device="meta")
    check_devices("op", [t], torch.device("meta"))
    with pytest.raises(CollectiveDeviceError, match="tensor 1"):
        check_devices("op", [t, torch.ones(1)], torch.device("meta"))


def _cuda_only_worker(rank: int, world: int, folder: str) -> None:
    dist.init_process_group("cuda:gloo", init_method=f"file://{folder}/store", rank=rank, world_size=world)
    results: dict[str, str] = {}

    def outcome(name, fn):
        try:
            fn()
            results[name] = "ok"
        except CollectiveDeviceError as e:
            results[name] = f"CollectiveDeviceError: {e}"
        except RuntimeError as e:
            results[name] = f"RuntimeError: {e}"

    try:
        results["backends"] = ",".join(sorted(backend_device_types()))
        outcome("raw", lambda: dist.all_reduce(torch.ones(2)))
        outcome("wrapper", lambda: all_reduce(torch.ones(2)))
        # The library's collectives, fed CPU batches as a CPU box must: each one must be stopped
        # by the device check (our error), not reach torch (its error).
        meter = AcceptanceMeter(["a", "b"])
        meter.update(torch.tensor([0, 1]), torch.tensor([True, False]), None)
        outcome("meter", meter.summary)
        threshold = ClassAwareThreshold(2)
        outcome("threshold", lambda: threshold.update(torch.tensor([0, 1]), torch.tensor([True, True])))
        outcome("ntxent", lambda: NTXentLoss()(torch.randn(4, 8), torch.randn(4, 8)))
        (Path(folder) / f"rank{rank}.json").write_text(json.dumps(results))
    finally:
        dist.destroy_process_group()


def test_cpu_collectives_fail_under_a_cuda_only_backend_and_the_library_checks_first(tmp_path):
    mp.spawn(_cuda_only_worker, args=(2, str(tmp_path)), nprocs=2, join=True)
    for rank in range(2):
        out = json.loads((tmp_path / f"rank{rank}.json").read_text())
        assert out["backends"] == "cuda"
        # NCCL's rule, reproduced: torch itself refuses a CPU tensor.
        assert out["raw"] == "RuntimeError: No backend type associated with device type cpu"
        for name in ("wrapper", "meter", "threshold", "ntxent"):
            assert out[name].startswith("CollectiveDeviceError: "), (name, out[name])
            assert "is on cpu" in out[name] and "cuda:gloo" in out[name], (name, out[name])
        assert out["ntxent"].startswith("CollectiveDeviceError: all_gather")


def _gloo_worker(rank: int, world: int, folder: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{folder}/store", rank=rank, world_size=world)
    try:
        meter = AcceptanceMeter(["a", "b"])
        labels = torch.tensor([0, 0, 1]) if rank == 0 else torch.tensor([1, 1, 1])
        meter.update(labels, torch.tensor([True, rank == 0, True]), torch.zeros(3, dtype=torch.long))
        gathered = all_gather(torch.full((2,), float(rank)))
        (Path(folder) / f"rank{rank}.json").write_text(json.dumps(
            {"summary": meter.summary(), "gathered": [g.tolist() for g in gathered]}))
    finally:
        dist.destroy_process_group()


def test_meter_sums_over_workers_under_gloo(tmp_path):
    mp.spawn(_gloo_worker, args=(2, str(tmp_path)), nprocs=2, join=True)
    out = [json.loads((tmp_path / f"rank{rank}.json").read_text()) for rank in range(2)]
    assert out[0] == out[1]
    # Accepted: rank 0 labels 0, 0, 1; rank 1 labels 1, 1 (its second image rejected): 5 of 6.
    # Correct (true label 0): the two accepted 0s.
    assert out[0]["summary"] == {"mask_rate": pytest.approx(5 / 6), "pseudo_acc": pytest.approx(2 / 5),
                                 "accepted/a": 2.0, "accepted/b": 3.0}
    assert out[0]["gathered"] == [[0.0, 0.0], [1.0, 1.0]]
