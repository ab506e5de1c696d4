import socket

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from polyclip.augment.simclr import simclr_augment
from polyclip.backbones import create_backbone, save_backbone
from polyclip.losses.ntxent import NTXentLoss
from polyclip.methods.simclr import SimCLRTask

WORLD, PER_RANK, DIM_IN, DIM_OUT, TAU = 2, 3, 5, 4, 0.2


def _global_batch() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return torch.randn(WORLD * PER_RANK, DIM_IN, generator=g), torch.randn(WORLD * PER_RANK, DIM_IN, generator=g)


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Linear(DIM_IN, DIM_OUT)


def _worker(rank: int, port: int, folder: str) -> None:
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD)
    try:
        torch.set_num_threads(1)
        model = DistributedDataParallel(_model())
        x1, x2 = _global_batch()
        shard = slice(rank * PER_RANK, (rank + 1) * PER_RANK)
        loss = NTXentLoss(TAU, gather_negatives=True)(model(x1[shard]), model(x2[shard]))
        loss.backward()  # DDP averages the parameter gradients over the two ranks
        torch.save((loss.item(), [p.grad for p in model.parameters()]), f"{folder}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.mark.timeout(300)  # two spawned interpreters import torch: seconds, more on a loaded machine
def test_two_worker_gather_equals_single_process_loss_and_gradients(tmp_path):
    mp.start_processes(_worker, args=(_free_port(), str(tmp_path)), nprocs=WORLD, start_method="spawn")

    model = _model()
    x1, x2 = _global_batch()
    loss = NTXentLoss(TAU, gather_negatives=False)(model(x1), model(x2))
    loss.backward()
    for rank in range(WORLD):
        rank_loss, rank_grads = torch.load(tmp_path / f"rank{rank}.pt")
        assert rank_loss == pytest.approx(loss.item(), rel=1e-6)
        for got, want in zip(rank_grads, (p.grad for p in model.parameters())):
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    # Local negatives only would give a different loss: the gather is what makes them equal.
    local = NTXentLoss(TAU, gather_negatives=False)(model(x1[:PER_RANK]), model(x2[:PER_RANK]))
    assert abs(local.item() - loss.item()) > 1e-3


def _tiny_task(seed: int = 0) -> SimCLRTask:
    torch.manual_seed(seed)
    backbone = create_backbone("random:small_cnn@4")
    return SimCLRTask(backbone, 3, simclr_augment(28, "small"), projection_dim=8, temperature=0.5)


def _batch() -> dict[str, torch.Tensor]:
    rng = np.random.default_rng(0)
    images = torch.from_numpy(rng.integers(0, 256, (16, 1, 28, 28), dtype=np.uint8))
    return {"u_x": images, "x": images[:6], "y": torch.tensor([0, 1, 2, 0, 1, 2])}


def test_one_step_lowers_the_loss_on_a_fixed_batch():
    task = _tiny_task().train()
    batch = _batch()
    optimizer = torch.optim.SGD(task.parameters(), lr=0.05)

    def losses() -> tuple[float, float]:
        torch.manual_seed(1)  # the same views before and after the step
        out = task(batch)
        return out, (out["ntxent"].item(), out["probe_loss"].item())

    out, (ntxent_before, probe_before) = losses()
    assert set(out) == {"loss", "ntxent", "positive_cos", "probe_loss", "probe_acc"}
    optimizer.zero_grad()
    out["loss"].backward()
    assert all(p.grad is not None for p in task.backbone.parameters())
    optimizer.step()
    _, (ntxent_after, probe_after) = losses()
    assert ntxent_after < ntxent_before and probe_after < probe_before


def test_probe_gradient_never_reaches_the_encoder():
    batch = _batch()

    def encoder_grads(probe_weight: float) -> tuple[list[torch.Tensor], torch.Tensor | None]:
        task = _tiny_task().train()
        task.probe_weight = probe_weight
        torch.manual_seed(1)  # the same views in both runs
        task(batch)["loss"].backward()
        return [p.grad.clone() for p in task.backbone.parameters()], task.probe.weight.grad

    with_probe, probe_grad = encoder_grads(1.0)
    without_probe, _ = encoder_grads(0.0)
    assert probe_grad is not None and probe_grad.abs().sum() > 0
    for a, b in zip(with_probe, without_probe):
        torch.testing.assert_close(a, b)


def test_predict_gives_probe_logits():
    task = _tiny_task().eval()
    assert task.predict(_batch()["x"]).shape == (6, 3)


def test_encoder_export_round_trips_through_create_backbone(tmp_path):
    task = _tiny_task().train()
    optimizer = torch.optim.SGD(task.parameters(), lr=0.1)
    out = task(_batch())
    out["loss"].backward()
    optimizer.step()
    save_backbone(task.backbone, tmp_path / "checkpoint" / "backbone")

    loaded = create_backbone(f"checkpoint:{tmp_path / 'checkpoint'}")
    assert loaded.num_features == task.backbone.num_features == 16
    images = _batch()["x"]
    task.eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded.encode(images), task.backbone.encode(images))
        fresh = create_backbone("random:small_cnn@4")
        assert not torch.allclose(fresh.encode(images), loaded.encode(images))


def test_bad_arguments_are_named():
    backbone = create_backbone("random:small_cnn@4")
    with pytest.raises(ValueError, match="at least 2 classes, got 1"):
        SimCLRTask(backbone, 1, simclr_augment(28, "small"))
    with pytest.raises(ValueError, match="dim=0"):
        SimCLRTask(backbone, 3, simclr_augment(28, "small"), projection_dim=0)
