"""The Ray Train side of every training job: one worker loop for every method.

``run_training`` builds a ``TorchTrainer`` (``ScalingConfig(num_workers, use_gpu)``,
DDP, checkpoints every epoch, ``FailureConfig`` restarts from the latest checkpoint)
and ``train_loop_per_worker`` runs whatever task the method's recipe builds.
"""

from __future__ import annotations

import json
import logging
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from jobs.config import JobConfig, parse_config
from jobs.recipes import RECIPES
from polyclip.engine import ArrayLoader, build_optimizer, build_scheduler, evaluate, train_one_epoch, zip_streams
from polyclip.engine.loop import cross_entropy_np
from polyclip.io import atomic_save_npz, atomic_write_json, atomic_write_with
from polyclip.progress import Progress

logger = logging.getLogger("polyclip")

STATE_FILE = "state.pt"
PREDICTIONS_FILE = "predictions.npz"
HISTORY_FILE = "history.json"
#: Epochs the run resumed from after a restart (a worker died, or the job was run again), in order.
RESUMES_FILE = "resumes.json"


def _resolve_payload(ref: Any) -> dict[str, Any]:
    import ray

    return ray.get(ref) if isinstance(ref, ray.ObjectRef) else ref


def train_loop_per_worker(config: dict[str, Any]) -> None:
    """Ray Train worker: build the task, train, validate, checkpoint, predict."""
    import ray.train
    import ray.train.torch

    cfg = parse_config(config["cfg"])
    recipe = RECIPES[cfg.method.name]
    payload = _resolve_payload(config["payload"])
    context = ray.train.get_context()
    rank, world = context.get_world_rank(), context.get_world_size()
    torch.set_num_threads(max(1, int(cfg.scaling.cpus_per_worker)))
    torch.manual_seed(cfg.seed)
    np.random.seed(cfg.seed)
    device = ray.train.torch.get_device()

    task = recipe.build_task(cfg, cfg.method, payload)
    inner = task
    if world > 1:
        task = ray.train.torch.prepare_model(task, parallel_strategy_kwargs={"find_unused_parameters": True})
    else:
        task = ray.train.torch.prepare_model(task)
    inner = getattr(task, "module", task)

    loaders = {
        prefix: ArrayLoader(payload[key], cfg.train.batch_size * mult, seed=cfg.seed + i, rank=rank,
                            world_size=world, drop_last=len(payload[key]["y" if "y" in payload[key] else "x"])
                            > cfg.train.batch_size * mult * world)
        for i, (prefix, (key, mult)) in enumerate(recipe.streams(cfg.method).items())
    }
    steps = cfg.train.steps_per_epoch or max(len(loader) for loader in loaders.values())
    optimizer = build_optimizer(inner.parameters(), cfg.train.optimizer, cfg.train.lr, cfg.train.weight_decay,
                                cfg.train.momentum, cfg.train.nesterov)
    total = steps * cfg.train.epochs
    scheduler = build_scheduler(optimizer, cfg.train.scheduler, total, int(cfg.train.warmup_epochs * steps))
    plateau = (torch.optim.lr_scheduler.ReduceLROnPlateau(optimizer, factor=0.5, patience=2)
               if cfg.train.scheduler == "plateau" else None)

    start_epoch, history, resumes = 0, [], []
    # The run's own latest checkpoint (a restart), else one handed in (a PBT clone, the previous segment).
    checkpoint = ray.train.get_checkpoint() or config.get("init_checkpoint")
    if checkpoint is not None:
        with checkpoint.as_directory() as folder:
            state = torch.load(Path(folder) / STATE_FILE, map_location=device, weights_only=False)
        start_epoch, history, resumes = load_training_state(state, cfg, inner, optimizer, scheduler, plateau)
        logger.info("rank %d resumed from checkpoint at epoch %d", rank, start_epoch)

    end_epoch = min(cfg.train.epochs, int(config.get("stop_after_epoch") or cfg.train.epochs))
    train_settings = cfg.dump()["train"]  # stored with each checkpoint: a load under other settings rebases
    val, test = payload["val"], payload["test"]
    for epoch in range(start_epoch, end_epoch):
        for loader in loaders.values():
            loader.set_epoch(epoch * 10_000)
        progress = Progress(f"epoch {epoch + 1}/{cfg.train.epochs} (rank {rank})", steps, unit="step",
                            interval=15.0) if rank == 0 else None
        if rank == 0 and epoch == start_epoch:  # submit_latency measures up to this line
            logger.info("rank 0 starts training at epoch %d/%d (unix time %.3f)", epoch + 1, cfg.train.epochs,
                        time.time())
        tic = time.perf_counter()
        logs = train_one_epoch(task, zip_streams(loaders, steps), optimizer, device=device, scheduler=scheduler,
                               grad_clip=cfg.train.grad_clip, progress=progress)
        seconds = time.perf_counter() - tic
        seen = sum(loader.batch_size for loader in loaders.values()) * steps * world
        metrics: dict[str, Any] = {"epoch": epoch + 1, **logs, "epoch_seconds": seconds,
                                   "train_images_per_s": seen / max(seconds, 1e-9)}
        last = epoch + 1 == cfg.train.epochs
        if rank == 0 and (last or epoch + 1 == end_epoch or (epoch + 1) % cfg.train.eval_every == 0):
            inner.eval()
            val_logits = evaluate(inner.predict, val["x"], device=device, batch_size=cfg.train.eval_batch_size)
            metrics["val_loss"] = cross_entropy_np(val_logits, val["y"])
            metrics["val_acc"] = float((val_logits.argmax(1) == val["y"]).mean())
        if plateau is not None:
            plateau.step(metrics.get("val_loss", logs["train_loss"]))
        if rank == 0:
            history.append({k: v for k, v in metrics.items() if isinstance(v, (int, float))})
            logger.info("epoch %d/%d: %s", epoch + 1, cfg.train.epochs,
                        ", ".join(f"{k}={v:.4g}" for k, v in metrics.items()
                                  if isinstance(v, float) and not k.startswith("per_class")))
        with tempfile.TemporaryDirectory() as tmp:
            ckpt = None
            if rank == 0:
                state = {"task": inner.state_dict(), "optimizer": optimizer.state_dict(),
                         "scheduler": scheduler.state_dict() if scheduler else None,
                         "plateau": plateau.state_dict() if plateau else None,
                         "epoch": epoch + 1, "history": history, "resumes": resumes, "train": train_settings}
                atomic_write_with(Path(tmp) / STATE_FILE, lambda p, s=state: torch.save(s, p))  # type: ignore[misc]
                atomic_write_json(Path(tmp) / HISTORY_FILE, history)
                atomic_write_json(Path(tmp) / RESUMES_FILE, resumes)
                if last:
                    _write_final(inner, Path(tmp), val, test, payload, device, cfg)
                ckpt = ray.train.Checkpoint.from_directory(tmp)
            ray.train.report({k: v for k, v in metrics.items() if isinstance(v, (int, float))}, checkpoint=ckpt)


def load_training_state(state: dict[str, Any], cfg: JobConfig, task: torch.nn.Module,
                        optimizer: torch.optim.Optimizer, scheduler: Any, plateau: Any) -> tuple[int, list, list]:
    """Load a checkpoint's state into a freshly built task, optimizer and schedules.

    If the checkpoint was written under other ``train`` settings (PBT hands a trial another
    trial's weights together with new hyperparameters), the optimizer keeps its state
    (momentum buffers) and the schedule keeps its position, but learning rate, weight decay
    and momentum are this config's.

    Returns:
        ``(epochs done, history, resumes)``; ``resumes`` gains the epoch resumed from.

    Raises:
        RuntimeError: The checkpoint's weights do not fit this model (a searched key that
            changes the architecture cannot be mutated mid-training).
    """
    try:
        task.load_state_dict(state["task"])
    except RuntimeError as exc:
        raise RuntimeError(f"the checkpoint's weights do not fit this job's model (did a mutated key change "
                           f"the architecture?): {str(exc).splitlines()[0]}") from exc
    fresh = [{k: v for k, v in group.items() if k != "params"} for group in optimizer.param_groups]
    optimizer.load_state_dict(state["optimizer"])
    if scheduler is not None and state.get("scheduler"):
        scheduler.load_state_dict(state["scheduler"])
    if plateau is not None and state.get("plateau"):
        plateau.load_state_dict(state["plateau"])
    settings = cfg.dump()["train"]
    if state.get("train", settings) != settings:
        for group, hyper in zip(optimizer.param_groups, fresh):
            group.update(hyper)
        if scheduler is not None:
            scheduler.base_lrs = [group["initial_lr"] for group in optimizer.param_groups]
            for group, base, factor in zip(optimizer.param_groups, scheduler.base_lrs, scheduler.lr_lambdas):
                group["lr"] = base * factor(scheduler.last_epoch)
    epoch = int(state["epoch"])
    return epoch, list(state["history"]), [*state.get("resumes", []), epoch]


def _write_final(task: torch.nn.Module, folder: Path, val: dict[str, np.ndarray], test: dict[str, np.ndarray],
                 payload: dict[str, Any], device: torch.device, cfg: JobConfig) -> None:
    """Final predictions (and the trained encoder, if any) go into the last checkpoint."""
    from polyclip.backbones import save_backbone

    task.eval()
    arrays = {
        "val_logits": evaluate(task.predict, val["x"], device=device, batch_size=cfg.train.eval_batch_size),
        "val_labels": val["y"],
        "test_logits": evaluate(task.predict, test["x"], device=device, batch_size=cfg.train.eval_batch_size),
        "test_labels": test["y"],
    }
    atomic_save_npz(folder / PREDICTIONS_FILE, **arrays)
    backbone = getattr(task, "backbone", None)
    if backbone is not None and hasattr(backbone, "preprocessing"):
        save_backbone(backbone.cpu(), folder / "backbone")
        backbone.to(device)
    atomic_write_json(folder / "class_names.json", payload["class_names"])


def use_gpu(cfg: JobConfig) -> bool:
    """``scaling.use_gpu``, with ``auto`` meaning: if the cluster has GPUs."""
    import ray

    if cfg.scaling.use_gpu == "auto":
        return ray.cluster_resources().get("GPU", 0) > 0
    return bool(cfg.scaling.use_gpu)


def build_trainer(cfg: JobConfig, payload_ref: Any, callbacks: list[Any] | None = None, *,
                  init_checkpoint: Any = None, stop_after_epoch: int | None = None) -> Any:
    """A ``TorchTrainer`` for this job (not started).

    Args:
        init_checkpoint: A ``ray.train.Checkpoint`` to start from when the run has none of
            its own (its ``train`` settings may differ: see :func:`load_training_state`).
        stop_after_epoch: End the run after this epoch (a PBT segment); the schedule is
            still the one of ``train.epochs``.
    """
    import ray.train
    from ray.train.torch import TorchTrainer

    gpu = use_gpu(cfg)
    resources = {"CPU": cfg.scaling.cpus_per_worker}
    scaling = ray.train.ScalingConfig(num_workers=cfg.scaling.num_workers, use_gpu=gpu,
                                      resources_per_worker=resources)
    run_config = ray.train.RunConfig(
        name=cfg.name,
        storage_path=cfg.run.storage_path,
        failure_config=ray.train.FailureConfig(max_failures=cfg.run.max_failures),
        checkpoint_config=ray.train.CheckpointConfig(num_to_keep=cfg.run.num_checkpoints),
        callbacks=callbacks or None,
    )
    return TorchTrainer(train_loop_per_worker, train_loop_config={"cfg": cfg.dump(), "payload": payload_ref,
                                                                 "init_checkpoint": init_checkpoint,
                                                                 "stop_after_epoch": stop_after_epoch},
                        scaling_config=scaling, run_config=run_config)


def read_final_checkpoint(checkpoint: Any, run_dir: Path) -> dict[str, Any]:
    """Copy the final checkpoint into ``run_dir/checkpoint`` (atomically) and load its outputs."""
    import shutil

    from polyclip.io import atomic_directory

    with checkpoint.as_directory() as folder, atomic_directory(run_dir / "checkpoint") as tmp:
        shutil.copytree(folder, tmp, dirs_exist_ok=True)
    target = run_dir / "checkpoint"
    if not (target / PREDICTIONS_FILE).exists():
        raise RuntimeError(f"the final checkpoint {target} has no {PREDICTIONS_FILE}: training did not finish")
    with np.load(target / PREDICTIONS_FILE) as data:
        arrays = {k: data[k] for k in data.files}
    resumes = json.loads((target / RESUMES_FILE).read_text()) if (target / RESUMES_FILE).exists() else []
    return {"arrays": arrays, "history": json.loads((target / HISTORY_FILE).read_text()), "resumes": resumes,
            "dir": target}
