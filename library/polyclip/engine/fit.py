"""One Ray-free fit loop behind every job, benchmark and notebook.

:func:`fit` owns everything between "a task module and its data" and "a trained task
with its history": the streams, the optimiser and every schedule (plateau included),
mixed precision, host-sync-free logging, sharded validation, resume state, and
callbacks. The Ray Train worker (``jobs/trainer.py``) is a thin wrapper around it: it
passes rank and world size through ``torch.distributed``, wraps the task with
``prepare_model``, and adds a callback that writes the checkpoint and calls
``ray.train.report``. In-process users (benchmarks, the Python API) call the same
function with arrays.

Example:
    >>> import numpy as np, torch
    >>> from polyclip.engine.fit import FitSettings, TaskData, EvalSet, fit
    >>> from polyclip.engine.streams import ArrayLoader
    >>> class Probe(torch.nn.Module):
    ...     def __init__(self):
    ...         super().__init__()
    ...         self.head = torch.nn.Linear(4, 2)
    ...     def predict(self, x):
    ...         return self.head(x)
    ...     def forward(self, batch):
    ...         return {"loss": torch.nn.functional.cross_entropy(self.head(batch["x"]), batch["y"])}
    >>> x = np.random.default_rng(0).normal(size=(32, 4)).astype("float32"); y = (x[:, 0] > 0).astype("int64")
    >>> data = TaskData(streams={"": ArrayLoader({"x": x, "y": y}, 8)}, val=EvalSet(x, y))
    >>> result = fit(Probe(), data, FitSettings(epochs=2, lr=0.1, progress=False))
    >>> [row["epoch"] for row in result.history]
    [1, 2]
"""

from __future__ import annotations

import copy
import dataclasses
import logging
import math
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np
import torch
from torch import nn

from polyclip import distributed as dist_utils
from polyclip.engine.optim import build_optimizer, build_scheduler
from polyclip.progress import Progress

logger = logging.getLogger("polyclip")

PRECISIONS = ("auto", "bf16", "fp16", "fp32")


@dataclass(frozen=True)
class FitSettings:
    """How to optimise; the ``train:`` section of a job config plus the seed.

    Attributes:
        epochs: Epochs of the schedule.
        steps_per_epoch: Optimiser steps per epoch; default one pass over the longest
            stream that knows its length.
        optimizer, lr, weight_decay, momentum, nesterov: See
            :func:`polyclip.engine.optim.build_optimizer` (weight decay skips biases and
            normalisation parameters).
        scheduler: ``cosine`` (warm-up, then half cosine to 0), ``fixmatch_cosine``,
            ``constant`` or ``plateau`` (halve the rate when validation loss stalls).
        warmup_epochs: Linear warm-up length, in epochs.
        grad_clip: Max global gradient norm, if set.
        eval_every: Validate every N epochs (and always after the last one).
        eval_batch_size: Rows per evaluation batch.
        precision: ``auto`` (bf16 autocast on GPUs that support it, else fp16 with a
            GradScaler on GPUs; fp32 on CPU), ``bf16``, ``fp16`` (GPU only) or ``fp32``.
        channels_last: Convert the task and 4-d batches to channels-last on GPUs.
        log_every_steps: Read losses back from the device every N steps (the only host
            syncs of the loop, besides the end of an epoch).
        seed: Seeds the streams and the torch RNG.
        stop_after_epoch: End after this epoch (a PBT segment); the schedule is still
            the one of ``epochs``.
        progress: Log progress with ETA on rank 0.
    """

    epochs: int = 10
    steps_per_epoch: int | None = None
    optimizer: str = "adam"
    lr: float = 1e-3
    weight_decay: float = 0.0
    momentum: float = 0.9
    nesterov: bool = False
    scheduler: str = "cosine"
    warmup_epochs: float = 0.0
    grad_clip: float | None = None
    eval_every: int = 1
    eval_batch_size: int = 256
    precision: str = "auto"
    channels_last: bool = False
    log_every_steps: int = 50
    seed: int = 0
    stop_after_epoch: int | None = None
    progress: bool = True

    def __post_init__(self) -> None:
        if self.epochs <= 0:
            raise ValueError(f"epochs must be positive, got {self.epochs}")
        if self.precision not in PRECISIONS:
            raise ValueError(f"unknown precision {self.precision!r}; valid: {', '.join(PRECISIONS)}")
        if self.log_every_steps <= 0:
            raise ValueError(f"log_every_steps must be positive, got {self.log_every_steps}")

    @classmethod
    def from_config(cls, train: Mapping[str, Any], **extra: Any) -> FitSettings:
        """Settings from a ``train:`` mapping (unknown keys are errors) plus ``extra`` (seed...)."""
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(train) - names)
        if unknown:
            raise ValueError(f"unknown train settings {unknown}; valid: {sorted(names)}")
        return cls(**{**train, **extra})

    def hyperparameters(self) -> dict[str, Any]:
        """What a checkpoint records: a resume under other values rebases the optimiser."""
        skip = {"stop_after_epoch", "progress", "seed"}
        return {k: v for k, v in dataclasses.asdict(self).items() if k not in skip}


class Stream(Protocol):
    """A source of mini-batches: :class:`~polyclip.engine.streams.ArrayLoader`, a Ray Data shard...

    ``forever()`` yields batches without end (cycling passes); ``set_epoch`` reseeds
    the order (deterministic streams) and may be a no-op; ``batch_size`` is per worker.
    """

    batch_size: int

    def set_epoch(self, epoch: int) -> None: ...

    def forever(self) -> Iterator[Mapping[str, torch.Tensor]]: ...


@dataclass
class EvalSet:
    """A labeled evaluation set small enough for arrays (validation, test)."""

    x: np.ndarray
    y: np.ndarray

    def __post_init__(self) -> None:
        if len(self.x) != len(self.y):
            raise ValueError(f"evaluation set: {len(self.x)} inputs but {len(self.y)} labels")


@dataclass
class TaskData:
    """What a task trains and validates on.

    Attributes:
        streams: Training streams by batch-key prefix: the labeled stream is ``""``
            (keys ``x``, ``y``...), the unlabeled pool ``"u_"`` (``u_x``...). Every stream
            cycles on its own, so 40 labeled images pair with a pool of millions.
        val: Validation set (selection, plateau, early reporting), if any.
        class_names: Class names, in label order.
    """

    streams: Mapping[str, Stream]
    val: EvalSet | None = None
    class_names: Sequence[str] = ()

    def __post_init__(self) -> None:
        if not self.streams:
            raise ValueError("TaskData needs at least one training stream")


@dataclass
class FitState:
    """Everything the loop mutates; callbacks read it, checkpoints are its :meth:`state_dict`."""

    task: nn.Module
    module: nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: Any
    plateau: Any
    scaler: Any
    settings: FitSettings
    device: torch.device
    rank: int = 0
    world: int = 1
    steps_per_epoch: int = 0
    epoch: int = 0
    step: int = 0
    history: list[dict[str, float]] = field(default_factory=list)
    resumes: list[int] = field(default_factory=list)

    @property
    def is_last_epoch(self) -> bool:
        return self.epoch == self.settings.epochs

    def state_dict(self) -> dict[str, Any]:
        """Plain tensors and Python values only: loads with ``torch.load(weights_only=True)``."""
        rng: dict[str, Any] = {"torch": torch.get_rng_state()}
        if self.device.type == "cuda":
            rng["cuda"] = torch.cuda.get_rng_state(self.device)
        return {
            "task": self.module.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict() if self.scheduler is not None else None,
            "plateau": _plain(self.plateau.state_dict()) if self.plateau is not None else None,
            "scaler": self.scaler.state_dict() if self.scaler is not None else None,
            "epoch": self.epoch,
            "step": self.step,
            "history": copy.deepcopy(self.history),
            "resumes": list(self.resumes),
            "train": self.settings.hyperparameters(),
            "rng": rng,
        }


class Callback:
    """Hooks into :func:`fit`; override what you need. Every rank calls every hook.

    Any object with some of these methods works as a callback (e.g.
    :class:`polyclip.tracking.TrackingCallback`); missing hooks are skipped.
    """

    def on_fit_start(self, state: FitState) -> None:
        """After the task, optimiser and resume state are set up."""

    def on_log(self, state: FitState, logs: dict[str, float]) -> None:
        """Every ``log_every_steps`` steps, with running means since the last log."""

    def on_epoch_end(self, state: FitState, metrics: dict[str, Any]) -> None:
        """After training and validation of an epoch; ``state.epoch`` is the epochs done."""

    def on_fit_end(self, state: FitState) -> None:
        """After the last epoch of this run (or of this segment)."""

    def on_fit_error(self, state: FitState, error: BaseException) -> None:
        """Training raised ``error`` (re-raised after the hooks): close files, flush trackers."""


@dataclass
class FitResult:
    """What :func:`fit` returns: the history (one row per epoch) and the final state."""

    history: list[dict[str, float]]
    state: FitState


def resolve_precision(precision: str, device: torch.device) -> tuple[torch.dtype | None, bool]:
    """``(autocast dtype or None, use a GradScaler)`` for a precision on a device.

    Raises:
        ValueError: An unknown precision, or fp16 without a GPU.
    """
    if precision not in PRECISIONS:
        raise ValueError(f"unknown precision {precision!r}; valid: {', '.join(PRECISIONS)}")
    if precision == "auto":
        if device.type != "cuda":
            return None, False
        precision = "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    if precision == "fp32":
        return None, False
    if precision == "bf16":
        return torch.bfloat16, False
    if device.type != "cuda":
        raise ValueError(f"precision fp16 needs a GPU (the task is on {device}); use bf16 or fp32")
    return torch.float16, True


def _plain(value: Any) -> Any:
    """Python containers of plain values (``ReduceLROnPlateau`` keeps numpy scalars)."""
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_plain(v) for v in value)
    if isinstance(value, np.generic):
        return value.item()
    return value


def _unwrap(task: nn.Module) -> nn.Module:
    inner = getattr(task, "module", task)
    return inner if isinstance(inner, nn.Module) else task


def steps_per_epoch(streams: Mapping[str, Any], settings: FitSettings) -> int:
    """``settings.steps_per_epoch``, else the length of the longest stream that has one."""
    if settings.steps_per_epoch:
        return settings.steps_per_epoch
    lengths = [len(s) for s in streams.values() if hasattr(s, "__len__")]
    if not lengths:
        raise ValueError("no stream knows its length (streamed data): set train.steps_per_epoch")
    return max(1, max(lengths))


def restore(state: Mapping[str, Any], fit_state: FitState) -> None:
    """Load a checkpoint's state into freshly built task, optimiser and schedules.

    If the checkpoint was written under other hyperparameters (PBT hands a trial another
    trial's weights together with new values), the optimiser keeps its state (momentum
    buffers) and the schedule keeps its position, but the learning rate, weight decay
    and momentum are this run's.

    Raises:
        RuntimeError: The checkpoint's weights do not fit this model.
    """
    try:
        fit_state.module.load_state_dict(state["task"])
    except RuntimeError as exc:
        raise RuntimeError(f"the checkpoint's weights do not fit this job's model (did a mutated key change "
                           f"the architecture?): {str(exc).splitlines()[0]}") from exc
    optimizer, scheduler = fit_state.optimizer, fit_state.scheduler
    fresh = [{k: v for k, v in group.items() if k != "params"} for group in optimizer.param_groups]
    optimizer.load_state_dict(state["optimizer"])
    if scheduler is not None and state.get("scheduler"):
        scheduler.load_state_dict(state["scheduler"])
    if fit_state.plateau is not None and state.get("plateau"):
        fit_state.plateau.load_state_dict(dict(state["plateau"]))
    if fit_state.scaler is not None and state.get("scaler"):
        fit_state.scaler.load_state_dict(state["scaler"])
    if state.get("train", fit_state.settings.hyperparameters()) != fit_state.settings.hyperparameters():
        for group, hyper in zip(optimizer.param_groups, fresh):
            group.update(hyper)
        if scheduler is not None:
            scheduler.base_lrs = [group["initial_lr"] for group in optimizer.param_groups]
            for group, base, factor in zip(optimizer.param_groups, scheduler.base_lrs, scheduler.lr_lambdas):
                group["lr"] = base * factor(scheduler.last_epoch)
    rng = state.get("rng") or {}
    if "torch" in rng:
        torch.set_rng_state(rng["torch"])
    if "cuda" in rng and fit_state.device.type == "cuda":
        torch.cuda.set_rng_state(rng["cuda"], fit_state.device)
    fit_state.epoch = int(state["epoch"])
    fit_state.step = int(state.get("step", 0))
    fit_state.history = [dict(row) for row in state["history"]]
    fit_state.resumes = [*state.get("resumes", []), fit_state.epoch]


@torch.no_grad()
def evaluate_sharded(predict: Callable[[torch.Tensor], torch.Tensor], x: np.ndarray, *, device: torch.device,
                     batch_size: int = 256, rank: int = 0, world: int = 1,
                     channels_last: bool = False) -> np.ndarray:
    """Logits of ``predict`` over all of ``x``, in order; with ``world > 1`` each rank
    evaluates one contiguous shard and the logits are gathered on the device.

    Every rank must call it (it is a collective when ``world > 1``).
    """
    n = len(x)
    per_rank = -(-n // world)
    lo, hi = min(n, rank * per_rank), min(n, (rank + 1) * per_rank)
    chunks = []
    for start in range(lo, hi, batch_size):
        batch = torch.from_numpy(np.array(x[start : min(hi, start + batch_size)])).to(
            device, non_blocking=True)
        if channels_last and batch.ndim == 4:
            batch = batch.contiguous(memory_format=torch.channels_last)
        chunks.append(predict(batch).float())
    if world == 1:
        if not chunks:
            raise ValueError("cannot evaluate an empty set")
        return torch.cat(chunks).cpu().numpy()
    # Shapes must match across ranks: pad the last shard, gather, drop the padding.
    num_classes = _num_outputs(predict, x, device, chunks)
    local = torch.cat(chunks) if chunks else torch.zeros(0, num_classes, device=device)
    padded = torch.zeros(per_rank, num_classes, device=device, dtype=torch.float32)
    padded[: len(local)] = local
    gathered = dist_utils.all_gather(padded, expected=device)
    return torch.cat(gathered)[:n].cpu().numpy()


def _num_outputs(predict: Callable[[torch.Tensor], torch.Tensor], x: np.ndarray, device: torch.device,
                 chunks: list[torch.Tensor]) -> int:
    if chunks:
        return int(chunks[0].shape[1])
    return int(predict(torch.from_numpy(np.ascontiguousarray(x[:1])).to(device)).shape[1])


def cross_entropy_np(logits: np.ndarray, labels: np.ndarray) -> float:
    """Mean cross-entropy of logits against labels (numpy, for validation loss)."""
    shifted = logits - logits.max(axis=1, keepdims=True)
    log_probs = shifted - np.log(np.exp(shifted).sum(axis=1, keepdims=True))
    return float(-log_probs[np.arange(len(labels)), labels].mean())


def _to_device(batch: Mapping[str, torch.Tensor], device: torch.device, channels_last: bool) -> dict[str, Any]:
    out = {}
    for key, value in batch.items():
        value = value.to(device, non_blocking=True)
        if channels_last and value.ndim == 4:
            value = value.contiguous(memory_format=torch.channels_last)
        out[key] = value
    return out


def _merged(iterators: Mapping[str, Iterator[Mapping[str, torch.Tensor]]]) -> dict[str, torch.Tensor]:
    batch: dict[str, torch.Tensor] = {}
    for prefix, it in iterators.items():
        try:
            part = next(it)
        except StopIteration:
            raise RuntimeError(f"stream {prefix or 'labeled'!r} ended; streams must cycle forever") from None
        for key, value in part.items():
            batch[prefix + key] = value
    return batch


def _train_epoch(state: FitState, data: TaskData, callbacks: Sequence[Callback], amp: torch.dtype | None) -> dict:
    settings, task, device = state.settings, state.task, state.device
    task.train()
    after_step: Callable[[], None] | None = getattr(state.module, "after_optimizer_step", None)
    for stream in data.streams.values():
        stream.set_epoch(state.epoch * 10_000)
    iterators = {prefix: iter(stream.forever()) for prefix, stream in data.streams.items()}
    steps = state.steps_per_epoch
    progress = (Progress(f"epoch {state.epoch + 1}/{settings.epochs}", steps, unit="step", interval=15.0)
                if settings.progress and state.rank == 0 else None)
    # Running sums stay on the device; they are read back every log_every_steps steps.
    totals: dict[str, torch.Tensor] = {}
    window: dict[str, torch.Tensor] = {}
    bad = torch.zeros((), dtype=torch.bool, device=device)
    window_start = 0
    params = [p for p in task.parameters() if p.requires_grad]
    for i in range(steps):
        batch = _to_device(_merged(iterators), device, settings.channels_last and device.type == "cuda")
        with torch.autocast(device.type, dtype=amp or torch.float32, enabled=amp is not None):
            out = task(batch)
        loss = out["loss"]
        state.optimizer.zero_grad(set_to_none=True)
        if state.scaler is not None:
            state.scaler.scale(loss).backward()
            if settings.grad_clip:
                state.scaler.unscale_(state.optimizer)
                nn.utils.clip_grad_norm_(params, settings.grad_clip)
            state.scaler.step(state.optimizer)
            state.scaler.update()
        else:
            loss.backward()
            if settings.grad_clip:
                nn.utils.clip_grad_norm_(params, settings.grad_clip)
            state.optimizer.step()
        if state.scheduler is not None:
            state.scheduler.step()
        if after_step is not None:
            after_step()
        bad |= ~torch.isfinite(loss.detach())
        for key, value in out.items():
            if isinstance(value, torch.Tensor) and value.numel() == 1:
                scalar = value.detach().float().reshape(())
                window[key] = window[key] + scalar if key in window else scalar
        state.step += 1
        if progress is not None:
            progress.update(1)
        if (i + 1) % settings.log_every_steps == 0 or i + 1 == steps:
            keys = list(window)
            values = torch.stack([window[k] for k in keys] + [bad.float()]).tolist()  # the one host sync
            if values[-1]:
                raise FloatingPointError(f"the loss became non-finite between steps {window_start + 1} and {i + 1} "
                                         f"of epoch {state.epoch + 1}; lower the learning rate or use fp32")
            count = i + 1 - window_start
            for key, value in zip(keys, values):
                totals[key] = totals.get(key, 0.0) + value  # type: ignore[assignment,operator]
            logs = {_log_name(k): v / count for k, v in zip(keys, values)}
            logs["lr"] = float(state.optimizer.param_groups[0]["lr"])
            _notify(callbacks, "on_log", state, logs)
            window, window_start = {}, i + 1
    if progress is not None:
        progress.close()
    logs = {_log_name(k): float(v) / steps for k, v in totals.items()}
    logs["lr"] = float(state.optimizer.param_groups[0]["lr"])
    summary = getattr(state.module, "epoch_summary", None)
    if summary is not None:
        logs.update(summary())
    return logs


def _notify(callbacks: Sequence[Any], hook: str, *args: Any) -> None:
    """Call ``hook`` on every callback that has it (callbacks need not subclass :class:`Callback`)."""
    for callback in callbacks:
        method = getattr(callback, hook, None)
        if method is not None:
            method(*args)


def _log_name(key: str) -> str:
    return "train_loss" if key == "loss" else f"train_{key}"


def fit(task: nn.Module, data: TaskData, settings: FitSettings, callbacks: Sequence[Callback] = (), *,
        device: torch.device | str | None = None, resume: Mapping[str, Any] | None = None,
        module: nn.Module | None = None) -> FitResult:
    """Train ``task`` on ``data``: the one loop behind every polyclip job.

    Args:
        task: The task module (``task(batch)["loss"]`` is minimised; ``predict(x)`` gives
            logits for validation). May be DDP-wrapped; pass the bare module as ``module``
            (default: ``task.module`` if present, else ``task``).
        data: Streams and validation set.
        settings: Optimisation settings.
        callbacks: Hooks (checkpointing, ``ray.train.report``, experiment trackers).
        device: Where to train; default the task's parameters' device.
        resume: A :meth:`FitState.state_dict` to continue from (a restart, or a PBT clone
            under other hyperparameters).

    Rank and world size come from ``torch.distributed`` when a process group exists.

    Returns:
        The history (one row of numeric metrics per epoch) and the final state.

    Raises:
        FloatingPointError: The loss became non-finite.
    """
    inner = module if module is not None else _unwrap(task)
    if device is None:
        first = next(inner.parameters(), None)
        device = first.device if first is not None else torch.device("cpu")
    device = torch.device(device)
    amp, use_scaler = resolve_precision(settings.precision, device)
    if settings.channels_last and device.type == "cuda":
        inner.to(memory_format=torch.channels_last)  # type: ignore[call-overload]
    optimizer = build_optimizer(inner, settings.optimizer, settings.lr, settings.weight_decay,
                                settings.momentum, settings.nesterov)
    steps = steps_per_epoch(data.streams, settings)
    scheduler = build_scheduler(optimizer, settings.scheduler, steps * settings.epochs,
                                int(settings.warmup_epochs * steps))
    plateau = (torch.optim.lr_scheduler.ReduceLROnPlateau(optimizer, factor=0.5, patience=2)
               if settings.scheduler == "plateau" else None)
    scaler = torch.amp.GradScaler(device.type) if use_scaler else None
    state = FitState(task=task, module=inner, optimizer=optimizer, scheduler=scheduler, plateau=plateau,
                     scaler=scaler, settings=settings, device=device, rank=dist_utils.rank(),
                     world=dist_utils.world_size(), steps_per_epoch=steps)
    if resume is not None:
        restore(resume, state)
        logger.info("rank %d resumed at epoch %d", state.rank, state.epoch)
    else:
        torch.manual_seed(settings.seed)
    if state.rank == 0:
        logger.info("fit: %d epochs x %d steps on %s (precision %s, world size %d)", settings.epochs, steps, device,
                    {None: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16+GradScaler"}[amp], state.world)
    try:
        # Collectives check their tensors against the training device for this fit (restored after).
        with dist_utils.on_training_device(device):
            _run_epochs(state, data, settings, callbacks, amp)
    except BaseException as error:
        _notify(callbacks, "on_fit_error", state, error)
        raise
    return FitResult(history=state.history, state=state)


def _run_epochs(state: FitState, data: TaskData, settings: FitSettings, callbacks: Sequence[Any],
                amp: torch.dtype | None) -> None:
    steps, plateau = state.steps_per_epoch, state.plateau
    _notify(callbacks, "on_fit_start", state)
    end = min(settings.epochs, settings.stop_after_epoch or settings.epochs)
    per_step = sum(stream.batch_size for stream in data.streams.values())
    while state.epoch < end:
        tic = time.perf_counter()
        logs = _train_epoch(state, data, callbacks, amp)
        seconds = time.perf_counter() - tic
        epoch = state.epoch + 1
        metrics: dict[str, Any] = {"epoch": epoch, **logs, "epoch_seconds": seconds,
                                   "train_images_per_s": per_step * steps * state.world / max(seconds, 1e-9)}
        if data.val is not None and (epoch == settings.epochs or epoch == end or epoch % settings.eval_every == 0):
            metrics.update(validate(state, data.val))
        if plateau is not None:
            plateau.step(metrics.get("val_loss", logs.get("train_loss", math.inf)))
        state.epoch = epoch
        state.history.append({k: v for k, v in metrics.items() if isinstance(v, (int, float))})
        if state.rank == 0:
            logger.info("epoch %d/%d: %s", epoch, settings.epochs,
                        ", ".join(f"{k}={v:.4g}" for k, v in metrics.items()
                                  if isinstance(v, float) and not k.startswith("per_class")))
        _notify(callbacks, "on_epoch_end", state, metrics)
    _notify(callbacks, "on_fit_end", state)


def validate(state: FitState, val: EvalSet) -> dict[str, float]:
    """``val_loss`` and ``val_acc`` of the task's ``predict``, sharded over the workers."""
    predict_logits = predict(state, val.x)
    return {"val_loss": cross_entropy_np(predict_logits, val.y),
            "val_acc": float((predict_logits.argmax(1) == val.y).mean())}


def predict(state: FitState, x: np.ndarray) -> np.ndarray:
    """Logits of the trained task over ``x`` (sharded over the workers; every rank must call it)."""
    state.module.eval()
    amp, _ = resolve_precision(state.settings.precision, state.device)
    with torch.autocast(state.device.type, dtype=amp or torch.float32, enabled=amp is not None):
        return evaluate_sharded(state.module.predict, x, device=state.device,  # type: ignore[arg-type]
                                batch_size=state.settings.eval_batch_size, rank=state.rank, world=state.world,
                                channels_last=state.settings.channels_last and state.device.type == "cuda")


def fit_arrays(task: nn.Module, arrays: Mapping[str, np.ndarray], *, epochs: int, batch_size: int | None = None,
               val: EvalSet | None = None, callbacks: Sequence[Callback] = (), **settings: Any) -> FitResult:
    """:func:`fit` on one in-memory labeled stream (probes on cached features, small benchmarks).

    Args:
        task: The task module.
        arrays: Aligned arrays (``x``, ``y``...); ``batch_size=None`` is full batch.
        epochs: Epochs (one pass over ``arrays`` each).
        val: Validation set, if any.
        settings: Other :class:`FitSettings` fields (``optimizer``, ``lr``, ``scheduler``,
            ``seed``...); progress logging is off unless asked for.

    Example:
        >>> import numpy as np, torch
        >>> from polyclip.methods.probe import ProbeTask
        >>> x = np.eye(4, dtype="float32").repeat(5, 0); y = np.arange(4).repeat(5)
        >>> result = fit_arrays(ProbeTask(4, 4), {"x": x, "y": y}, epochs=30, lr=0.1, scheduler="constant")
        >>> result.history[-1]["train_loss"] < 0.5
        True
    """
    from polyclip.engine.streams import ArrayLoader

    n = len(next(iter(arrays.values())))
    seed = int(settings.get("seed", 0))
    loader = ArrayLoader(arrays, batch_size or n, seed=seed)
    settings.setdefault("progress", False)
    settings.setdefault("log_every_steps", 1_000_000)
    return fit(task, TaskData(streams={"": loader}, val=val), FitSettings(epochs=epochs, **settings), callbacks)
