"""Class-aware adaptive thresholds: the paper's update rule by hand, on the batch's device, under DDP."""

import json
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from polyclip.distributed import CollectiveDeviceError
from polyclip.methods.class_aware_threshold import ClassAwareThreshold


def hand_update(tau, p, prior, counts, batch_size, alpha, eps):
    # Lucas et al.: p_c is the share of *all* unlabeled images confidently labeled c.
    new_p = [alpha * pc + (1 - alpha) * n / batch_size for pc, n in zip(p, counts)]
    new_tau = [t + eps * ((pc > r) - (pc < r)) for t, pc, r in zip(tau, new_p, prior)]
    return new_tau, new_p


def test_update_matches_hand_computation_with_a_prior():
    prior = [0.5, 0.3, 0.2]
    th = ClassAwareThreshold(3, init=0.9, alpha=0.8, eps=0.01, prior=prior)
    labels = torch.tensor([0, 0, 1, 2, 2, 2, 1])
    mask = torch.tensor([True, False, True, True, True, True, False])  # accepted: 0 x1, 1 x1, 2 x3
    tau, p = [0.9] * 3, list(prior)
    for _ in range(3):
        th.update(labels, mask)
        tau, p = hand_update(tau, p, prior, [1, 1, 3], 7, 0.8, 0.01)
        assert torch.allclose(th.p, torch.tensor(p), atol=1e-6)
        assert torch.allclose(th.tau, torch.tensor(tau), atol=1e-6)
    # Class 2 is over-represented (3 of 7 images > 0.2): stricter; classes 0 and 1 more lenient.
    assert th.tau[2] > 0.9 > th.tau[0]


def test_share_is_among_all_images_not_among_the_accepted():
    # Half the batch accepted, all as class 0, uniform prior over 2 classes. Among all images
    # class 0's share is 0.5 = r_0 (threshold kept); among the accepted it would be 1.0
    # (threshold raised). The paper's rule keeps it, and lowers class 1's.
    th = ClassAwareThreshold(2, init=0.9, alpha=0.9, eps=0.01)
    th.update(torch.tensor([0, 0, 1, 1]), torch.tensor([True, True, False, False]))
    assert torch.allclose(th.p, torch.tensor([0.5, 0.45]))
    assert torch.allclose(th.tau, torch.tensor([0.9, 0.89]))


def test_update_stays_on_the_training_device():
    # The meta device stands in for a GPU on a CPU machine: counts built on the CPU, or read
    # back to the host (.item() fails on meta), break this test as they would break NCCL.
    th = ClassAwareThreshold(3, init=0.9).to("meta")
    labels, mask = torch.zeros(6, dtype=torch.long, device="meta"), torch.ones(6, dtype=torch.bool, device="meta")
    th.update(labels, mask)
    assert th.tau.device.type == th.p.device.type == "meta"
    with pytest.raises(CollectiveDeviceError, match="is on cpu, but the training device is meta"):
        th.update(torch.zeros(2, dtype=torch.long), torch.ones(2, dtype=torch.bool))


def test_equal_share_keeps_the_threshold_and_clipping_holds():
    th = ClassAwareThreshold(2, init=0.5, eps=0.3, tau_min=0.4, tau_max=0.6)
    th.update(torch.tensor([0, 1]), torch.tensor([True, True]))
    assert torch.allclose(th.tau, torch.tensor([0.5, 0.5]))
    th.update(torch.tensor([0, 0]), torch.tensor([True, True]))
    assert torch.allclose(th.tau, torch.tensor([0.6, 0.4]))


def test_accept_uses_the_threshold_of_the_predicted_class():
    th = ClassAwareThreshold(2, init=0.7)
    th.tau.copy_(torch.tensor([0.9, 0.6]))
    mask, labels = th.accept(torch.tensor([[0.8, 0.2], [0.35, 0.65], [0.95, 0.05]]))
    assert mask.tolist() == [False, True, True] and labels.tolist() == [0, 1, 0]


@pytest.mark.parametrize("kwargs,match", [({"prior": [1.0, -1.0]}, "prior"), ({"prior": [1.0]}, "prior"),
                                          ({"alpha": 1.0}, "alpha"), ({"init": 0.2, "tau_min": 0.5}, "init")])
def test_bad_arguments_are_named(kwargs, match):
    with pytest.raises(ValueError, match=match):
        ClassAwareThreshold(2, **kwargs)


def _worker(rank: int, world: int, folder: str) -> None:
    # A file rendezvous: no port to race for.
    dist.init_process_group("gloo", init_method=f"file://{folder}/store", rank=rank, world_size=world)
    try:
        th = ClassAwareThreshold(3, init=0.9, eps=0.01)
        # Each rank sees different pseudo-labels; the update must use the global counts.
        labels = torch.tensor([0, 0, 0, 1]) if rank == 0 else torch.tensor([2, 2, 1, 1])
        for _ in range(5):
            th.update(labels, torch.ones(4, dtype=torch.bool))
        (Path(folder) / f"rank{rank}.json").write_text(json.dumps([th.tau.tolist(), th.p.tolist()]))
    finally:
        dist.destroy_process_group()


def test_all_reduce_gives_identical_thresholds_on_two_processes(tmp_path):
    # Spawned, not forked (this process may hold a Ray driver, which must not be forked), and
    # results come back through files rather than a Manager (whose server process is forked).
    mp.spawn(_worker, args=(2, str(tmp_path)), nprocs=2, join=True)
    out = [json.loads((tmp_path / f"rank{rank}.json").read_text()) for rank in range(2)]
    (tau0, p0), (tau1, p1) = out
    assert tau0 == tau1 and p0 == p1
    # The global counts are [3, 3, 2] of 8, not either rank's own.
    reference = ClassAwareThreshold(3, init=0.9, eps=0.01)
    for _ in range(5):
        reference.update(torch.tensor([0, 0, 0, 1, 2, 2, 1, 1]), torch.ones(8, dtype=torch.bool))
    assert torch.allclose(torch.tensor(tau0), reference.tau) and torch.allclose(torch.tensor(p0), reference.p)


def test_labels_and_mask_must_match():
    with pytest.raises(ValueError, match=r"\(3,\) and \(2,\)"):
        ClassAwareThreshold(2).update(torch.zeros(3, dtype=torch.long), torch.ones(2, dtype=torch.bool))
