"""The Ray Train side of every training job: a thin wrapper around :func:`polyclip.engine.fit.fit`.

``build_trainer`` builds a ``TorchTrainer`` (``ScalingConfig(num_workers, use_gpu)``,
DDP, checkpoints every epoch, ``FailureConfig`` restarts from the latest checkpoint, the
streamed splits as Ray Datasets). ``train_loop_per_worker`` builds the recipe's task,
wraps it with ``prepare_model``, and runs the one fit loop with a callback that writes
the checkpoint and calls ``ray.train.report``.
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
from jobs.recipes.base import Payload
from polyclip.engine import ArrayLoader
from polyclip.engine.fit import Callback, EvalSet, FitSettings, FitState, TaskData, fit, predict, restore
from polyclip.io import atomic_save_npz, atomic_write_json, atomic_write_with

logger = logging.getLogger("polyclip")

STATE_FILE = "state.pt"
PREDICTIONS_FILE = "predictions.npz"
HISTORY_FILE = "history.json"
#: Epochs the run resumed from after a restart (a worker died, or the job was run again), in order.
RESUMES_FILE = "resumes.json"


def _resolve_payload(ref: Any) -> Payload:
    import ray

    return ray.get(ref) if isinstance(ref, ray.ObjectRef) else ref


def fit_settings(cfg: JobConfig, stop_after_epoch: int | None = None) -> FitSettings:
    """The fit loop's settings: the ``train:`` section (less the per-worker batch size) and the seed."""
    train = cfg.dump()["train"]
    train.pop("batch_size")
    return FitSettings.from_config(train, seed=cfg.seed, stop_after_epoch=stop_after_epoch)


def build_streams(cfg: JobConfig, recipe: Any, payload: Payload, rank: int, world: int,
                  streamed: dict[str, dict[str, Any]], device: torch.device) -> dict[str, Any]:
    """One stream per recipe stream: a Ray Data shard for streamed splits, else an in-memory ``ArrayLoader``."""
    from jobs.streaming import ShardStream

    streams: dict[str, Any] = {}
    for i, (prefix, (key, mult)) in enumerate(recipe.streams(cfg.method).items()):
        batch = cfg.train.batch_size * mult
        if key in streamed:
            info = streamed[key]
            streams[prefix] = ShardStream(key, batch, info["num_rows"] // world, tuple(info["columns"]),
                                          shuffle_buffer=cfg.data.shuffle_buffer,
                                          prefetch_batches=cfg.data.prefetch_batches, seed=cfg.seed + 1000 * rank + i,
                                          pin_memory=device.type == "cuda")
            continue
        arrays = payload.arrays(key)
        n = len(arrays["y" if "y" in arrays else "x"])
        streams[prefix] = ArrayLoader(arrays, batch, seed=cfg.seed + i, rank=rank, world_size=world,
                                      drop_last=n > batch * world)
    return streams


def train_loop_per_worker(config: dict[str, Any]) -> None:
    """Ray Train worker: build the task, wrap it for DDP, and hand it to :func:`polyclip.engine.fit.fit`."""
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
    sync = cfg.scaling.sync_batchnorm if cfg.scaling.sync_batchnorm is not None else cfg.method.name == "simclr"
    if sync and world > 1:
        if device.type == "cuda":  # batch statistics over the global batch (SimCLR's convention)
            task = torch.nn.SyncBatchNorm.convert_sync_batchnorm(task)
        elif rank == 0 and cfg.scaling.sync_batchnorm:
            logger.warning("scaling.sync_batchnorm needs GPU workers (PyTorch's SyncBatchNorm has no CPU kernel); "
                           "BatchNorm stays per worker on %s", device)
    # DDP searches for unused parameters only for tasks that declare some (it costs a graph walk per step).
    unused = bool(getattr(task, "has_unused_parameters", False))
    wrapped = ray.train.torch.prepare_model(
        task, parallel_strategy_kwargs={"find_unused_parameters": unused} if world > 1 else None)
    streams = build_streams(cfg, recipe, payload, rank, world, config.get("streamed") or {}, device)
    settings = fit_settings(cfg, config.get("stop_after_epoch"))

    resume = None
    # The run's own latest checkpoint (a restart), else one handed in (a PBT clone, the previous segment).
    checkpoint = ray.train.get_checkpoint() or config.get("init_checkpoint")
    if checkpoint is not None:
        with checkpoint.as_directory() as folder:
            resume = load_state(Path(folder) / STATE_FILE, device)
    val = payload.val
    data = TaskData(streams=streams, val=EvalSet(val["x"], val["y"]), class_names=list(payload.class_names))
    callbacks: list[Any] = [ReportCallback(cfg, payload)]
    if rank == 0:
        callbacks.insert(0, StartTimeCallback())
        if cfg.run.loggers and config.get("tracking_dir"):
            from polyclip.tracking import TrackingCallback, build_loggers

            loggers = build_loggers(cfg.run.loggers, config["tracking_dir"], cfg.name, cfg.dump())
            callbacks.append(TrackingCallback(loggers))
    fit(wrapped, data, settings, callbacks, device=device, resume=resume, module=task)


def load_state(path: Path, device: torch.device) -> dict[str, Any]:
    """A checkpoint's training state, loaded without unpickling (``weights_only=True``).

    Raises:
        RuntimeError: The file is not a polyclip training state (e.g. a pickle from an
            older polyclip, or a file someone replaced on shared storage).
    """
    try:
        return torch.load(path, map_location=device, weights_only=True)
    except Exception as exc:  # torch raises UnpicklingError, RuntimeError, EOFError...
        raise RuntimeError(f"{path} is not a loadable training state ({type(exc).__name__}: "
                           f"{str(exc).splitlines()[0] if str(exc) else ''}); checkpoints load without unpickling, "
                           "so a state written by a polyclip older than the fit loop cannot be resumed: start "
                           "a new run name") from exc


class StartTimeCallback(Callback):
    """Logs the moment rank 0 starts training (``jobs/benchmarks/submit_latency.py`` measures up to it)."""

    def on_fit_start(self, state: FitState) -> None:
        logger.info("rank 0 starts training at epoch %d/%d (unix time %.3f)", state.epoch + 1,
                    state.settings.epochs, time.time())


class ReportCallback(Callback):
    """Every epoch: the checkpoint (rank 0) and ``ray.train.report`` (every rank).

    The last epoch's checkpoint also holds the final validation and test predictions
    (computed sharded over the workers), the trained encoder and the class names.
    """

    def __init__(self, cfg: JobConfig, payload: Payload) -> None:
        self.cfg, self.payload = cfg, payload

    def on_epoch_end(self, state: FitState, metrics: dict[str, Any]) -> None:
        import ray.train

        final = None
        if state.is_last_epoch:  # every rank takes part in the sharded predictions
            val, test = self.payload.val, self.payload.test
            final = {"val_logits": predict(state, val["x"]), "val_labels": val["y"],
                     "test_logits": predict(state, test["x"]), "test_labels": test["y"]}
        with tempfile.TemporaryDirectory() as tmp:
            ckpt = None
            if state.rank == 0:
                folder = Path(tmp)
                snapshot = state.state_dict()
                atomic_write_with(folder / STATE_FILE, lambda p, s=snapshot: torch.save(s, p))  # type: ignore[misc]
                atomic_write_json(folder / HISTORY_FILE, state.history)
                atomic_write_json(folder / RESUMES_FILE, state.resumes)
                if final is not None:
                    _write_final(state.module, folder, final, self.payload.class_names, state.device)
                ckpt = ray.train.Checkpoint.from_directory(tmp)
            ray.train.report({k: v for k, v in metrics.items() if isinstance(v, (int, float))}, checkpoint=ckpt)


def load_training_state(state: dict[str, Any], cfg: JobConfig, task: torch.nn.Module,
                        optimizer: torch.optim.Optimizer, scheduler: Any, plateau: Any) -> tuple[int, list, list]:
    """Load a checkpoint's state into a freshly built task, optimizer and schedules (see :func:`restore`).

    Returns:
        ``(epochs done, history, resumes)``; ``resumes`` gains the epoch resumed from.
    """
    fit_state = FitState(task=task, module=task, optimizer=optimizer, scheduler=scheduler, plateau=plateau,
                         scaler=None, settings=fit_settings(cfg), device=torch.device("cpu"))
    restore(state, fit_state)
    return fit_state.epoch, fit_state.history, fit_state.resumes


def _write_final(task: torch.nn.Module, folder: Path, arrays: dict[str, np.ndarray], class_names: list[str],
                 device: torch.device) -> None:
    """Final predictions (and the trained encoder, if any) go into the last checkpoint."""
    from polyclip.backbones import save_backbone

    atomic_save_npz(folder / PREDICTIONS_FILE, **arrays)
    backbone = getattr(task, "backbone", None)
    if backbone is not None and hasattr(backbone, "preprocessing"):
        save_backbone(backbone.cpu(), folder / "backbone")
        backbone.to(device)
    atomic_write_json(folder / "class_names.json", list(class_names))


def use_gpu(cfg: JobConfig) -> bool:
    """Whether the job trains on GPUs (``scaling.use_gpu``; see :func:`jobs.gpu.resolve_gpu`).

    ``auto`` picks GPUs when the cluster has them or its autoscaler can add them; ``true``
    waits up to ``scaling.gpu_wait_s`` for them and fails clearly instead of training on CPU.
    The choice and its reason are logged.
    """
    from jobs.gpu import resolve_gpu

    return resolve_gpu(cfg.scaling, num_workers=cfg.scaling.num_workers).use_gpu  # logs the choice and reason


def training_inputs(cfg: JobConfig, payload: Payload) -> tuple[Any, dict[str, Any]]:
    """Split a recipe's payload into what travels by object ref (small arrays) and the streamed splits.

    Returns:
        ``(payload ref, streamed)``: pass both to :func:`build_trainer`. The pool (and any
        large labeled split) becomes a Ray Dataset; the payload keeps only its row count.
    """
    import ray

    from jobs.streaming import split_streamed

    recipe = RECIPES[cfg.method.name]
    keys = {key for key, _ in recipe.streams(cfg.method).values()}
    if not cfg.data.stream_pool:  # only splits that are already streams (from a source) stream
        keys = {key for key in keys if not isinstance(payload.split(key), dict)}
    streamed = split_streamed(payload, keys, cfg.seed)
    return ray.put(payload), streamed


def tracking_dir(cfg: JobConfig) -> Path:
    """Where rank 0 writes TensorBoard events (and W&B / MLflow files): ``<run dir>/tracking``.

    An absolute path fixed on the driver; on a multi-node cluster it is on the node of
    rank 0, so point ``run.output_dir`` at shared storage to read it from elsewhere.
    """
    return (cfg.run_dir / "tracking").resolve()


def build_trainer(cfg: JobConfig, payload_ref: Any, callbacks: list[Any] | None = None, *,
                  init_checkpoint: Any = None, stop_after_epoch: int | None = None,
                  streamed: dict[str, Any] | None = None) -> Any:
    """A ``TorchTrainer`` for this job (not started).

    Args:
        payload_ref: The recipe's payload (an object ref, or the dict itself: its streamed
            splits are then taken out here, see :func:`training_inputs`).
        init_checkpoint: A ``ray.train.Checkpoint`` to start from when the run has none of
            its own (its ``train`` settings may differ: see :func:`polyclip.engine.fit.restore`).
        stop_after_epoch: End the run after this epoch (a PBT segment); the schedule is
            still the one of ``train.epochs``.
        streamed: Splits that reach the workers as Ray Datasets (``jobs.streaming.StreamedSplit``
            by payload key), from :func:`training_inputs`.
    """
    import ray.train
    from ray.train.torch import TorchTrainer

    if isinstance(payload_ref, Payload):
        payload_ref, streamed = training_inputs(cfg, payload_ref)
    streamed = streamed or {}
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
    # Workers learn each streamed split's size and columns here; the rows come through get_dataset_shard.
    described = {key: {"num_rows": split.num_rows, "columns": list(split.columns)} for key, split in streamed.items()}
    return TorchTrainer(train_loop_per_worker, train_loop_config={"cfg": cfg.dump(), "payload": payload_ref,
                                                                 "init_checkpoint": init_checkpoint,
                                                                 "stop_after_epoch": stop_after_epoch,
                                                                 "streamed": described,
                                                                 "tracking_dir": str(tracking_dir(cfg))},
                        scaling_config=scaling, run_config=run_config,
                        datasets={key: split.dataset for key, split in streamed.items()} or None,
                        dataset_config=ray.train.DataConfig(datasets_to_split="all"))


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
