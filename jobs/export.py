"""Export a trained model or an ensemble to ONNX (checked with onnxruntime) and safetensors.

Usage::

    python -m jobs.export --run runs/<name> --out exports/<name>
    python -m jobs.export --ensemble runs/ensemble-demo/ensemble --out exports/ensemble

A run (``probe``, ``finetune`` or ``distill``) becomes one ``model.onnx``: float images in
[0, 1] at the encoder's size and channels, ``(B, C, S, S)``, to class logits ``(B, K)``.
Normalisation is inside the graph; resizing (and repeating grayscale channels for RGB
encoders) is the caller's, as ``export.json`` describes. The run's encoder comes from
``checkpoint/backbone`` (trained runs) or ``backbone.spec`` (probes on frozen features),
its head from ``checkpoint/state.pt``.

An ensemble becomes ``encoders/<i>.onnx`` (images -> features), ``heads/<i>.onnx``
(features -> logits) and ``ensemble.onnx`` (every member's features -> ensemble logits
and per-image backbone weights), as serving runs it.

Every ``.onnx`` has a ``.safetensors`` beside it with the same module's weights, and is
run by onnxruntime on random inputs of another batch size than the export's; the largest
absolute difference from torch goes into ``export.json``, and an export beyond the
tolerance fails. ``--benchmark`` adds per-image latency of torch and onnxruntime.
"""

from __future__ import annotations

import json
import logging
import re
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from jobs.cli import exit_on_error, job_parser
from jobs.recipes.base import Payload
from jobs.recipes.distill import DistillExtras
from jobs.recipes.finetune import FinetuneExtras
from polyclip.backbones import Backbone, create_backbone
from polyclip.backbones.factory import checkpoint_dir
from polyclip.io import atomic_directory, atomic_write_json

logger = logging.getLogger("polyclip")

#: Methods whose run ``--run`` exports, and how their model is put together.
EXPORTABLE_METHODS = ("probe", "finetune", "distill")
OPSET = 17


class ExportError(ValueError):
    """A run or ensemble cannot be exported, or its ONNX model disagrees with torch."""


@dataclass(frozen=True)
class Tolerance:
    """``|onnx - torch| <= atol + rtol * |torch|`` elementwise."""

    atol: float = 1e-4
    rtol: float = 1e-3


class ImageModel(nn.Module):
    """Images in [0, 1] at the encoder's size -> what ``predict`` returns (logits)."""

    def __init__(self, predict: Callable[[torch.Tensor], torch.Tensor], modules: dict[str, nn.Module]) -> None:
        super().__init__()
        self.parts = nn.ModuleDict(modules)
        self._predict = predict

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self._predict(images)


class EncoderModel(nn.Module):
    """Images in [0, 1] at the encoder's size -> features ``(B, D)``."""

    def __init__(self, backbone: Backbone) -> None:
        super().__init__()
        self.backbone = backbone

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.backbone.forward_features(self.backbone.normalize(images))


class EnsembleModel(nn.Module):
    """Every member's features (one input each) -> ``(logits, weights)``."""

    def __init__(self, ensemble: nn.Module) -> None:
        super().__init__()
        self.ensemble = ensemble

    def forward(self, *features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.ensemble(list(features))  # type: ignore[no-any-return]


def _read_run(run: Path) -> tuple[Any, dict[str, Any], list[str], Path]:
    from jobs.config import load_config

    config, folder = run / "config.yaml", run / "checkpoint"
    if not config.is_file():
        raise ExportError(f"--run {run}: no config.yaml (is it a run directory written by jobs.train?)")
    for name in ("state.pt", "class_names.json"):
        if not (folder / name).is_file():
            raise ExportError(f"--run {run}: {folder / name} is missing (did the run finish?)")
    cfg = load_config(config)
    if cfg.method.name not in EXPORTABLE_METHODS:
        raise ExportError(f"--run {run}: method {cfg.method.name!r} cannot be exported; "
                          f"exportable: {', '.join(EXPORTABLE_METHODS)}")
    state = torch.load(folder / "state.pt", map_location="cpu", weights_only=True)["task"]
    return cfg, state, json.loads((folder / "class_names.json").read_text()), folder


def build_run_model(run: str | Path) -> tuple[nn.Module, Backbone, dict[str, Any]]:
    """The run's classifier as one module over [0, 1] images, its encoder, and a description.

    The task is rebuilt by the method's own recipe (so ``predict`` is exactly the one the
    run evaluated) with the trained weights loaded strictly.

    Raises:
        ExportError: Not a finished run, or a method that cannot be exported.
    """
    from jobs.recipes import RECIPES

    run = Path(run)
    cfg, state, class_names, folder = _read_run(run)
    method = cfg.method.name
    empty = {"x": np.zeros((0, 1), np.float32), "y": np.zeros(0, np.int64)}
    payload = Payload(train=empty, val=empty, test=empty, class_names=class_names)
    if method == "probe":
        head_in = next(v for k, v in state.items() if k.startswith("head.") and k.endswith("weight"))
        payload.input_shape = (int(head_in.shape[1]),)
        backbone = create_backbone(cfg.backbone.spec, image_size=cfg.backbone.image_size)
        task = RECIPES[method].build_task(cfg, cfg.method, payload)
        task.load_state_dict(state, strict=True)

        def predict(images: torch.Tensor) -> torch.Tensor:
            return task.predict(backbone.forward_features(backbone.normalize(images)))  # type: ignore[operator]

        model: nn.Module = ImageModel(predict, {"backbone": backbone, "task": task})
    else:
        encoder = checkpoint_dir(folder)  # the trained encoder; no hub download to rebuild it
        trained = cfg.model_copy(update={"backbone": cfg.backbone.model_copy(
            update={"spec": f"checkpoint:{encoder}", "image_size": None})})
        payload.input_shape = (1, 1, 1)  # a checkpoint encoder ignores in_chans
        if method == "distill":
            payload.extras = DistillExtras(teacher_dim=int(state["project.weight"].shape[0]))
        else:  # finetune: CES's similarity matrix is a buffer, replaced by the state
            ces = getattr(cfg.method, "loss", "ce") == "ces"
            payload.extras = FinetuneExtras(np.eye(len(class_names), dtype=np.float32) if ces else None)
        task = RECIPES[method].build_task(trained, cfg.method, payload)
        task.load_state_dict(state, strict=True)
        backbone = task.backbone  # type: ignore[assignment]
        model = ImageModel(task.predict, {"task": task})  # type: ignore[arg-type]
    prep = backbone.preprocessing
    description = {
        "kind": "run", "run": str(run.resolve()), "method": method, "backbone_spec": cfg.backbone.spec,
        "class_names": class_names,
        "input": {"name": "images", "shape": ["batch", prep.in_chans, prep.image_size, prep.image_size],
                  "dtype": "float32", "range": [0.0, 1.0],
                  "preprocessing": {"image_size": prep.image_size, "in_chans": prep.in_chans,
                                    "mean": list(prep.mean), "std": list(prep.std),
                                    "note": "resize to image_size and match in_chans before the model; "
                                            "mean/std are applied inside the graph"}},
        "output": {"name": "logits", "shape": ["batch", len(class_names)]},
    }
    return model.eval(), backbone, description


def save_safetensors(module: nn.Module, path: Path) -> Path:
    """The module's weights and buffers as safetensors (tied tensors stored once per name)."""
    from safetensors.torch import save_file

    tensors = {k: v.detach().cpu().contiguous().clone() for k, v in module.state_dict().items()}

    def write(tmp: Path) -> None:
        save_file(tensors, str(tmp))

    from polyclip.io import atomic_write_with

    return atomic_write_with(path, write)


def export_onnx(module: nn.Module, inputs: Sequence[torch.Tensor], path: Path, input_names: Sequence[str],
                output_names: Sequence[str], *, tolerance: Tolerance = Tolerance(), check_batch: int = 3,
                seed: int = 0) -> dict[str, Any]:
    """Export ``module`` with a dynamic batch axis, then run it in onnxruntime against torch.

    Args:
        module: In eval mode.
        inputs: Example inputs (their batch size is the trace's).
        path: The ``.onnx`` file; a ``.safetensors`` of the same name is written beside it.
        input_names / output_names: Graph names.
        tolerance: Allowed difference between onnxruntime and torch.
        check_batch: Batch size of the check (differs from the trace's to test the dynamic axis).
        seed: Seed of the check's random inputs.

    Returns:
        ``{"onnx", "safetensors", "max_abs_diff", "check_batch"}``.

    Raises:
        ExportError: onnxruntime's outputs differ from torch's beyond ``tolerance``.
    """
    import warnings

    import onnxruntime

    path.parent.mkdir(parents=True, exist_ok=True)
    axes = {name: {0: "batch"} for name in [*input_names, *output_names]}
    tmp = path.with_name(f".{path.name}.tmp")
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the TorchScript exporter's tracer warnings about Python constants
        torch.onnx.export(module, tuple(inputs), str(tmp), dynamo=False, input_names=list(input_names),
                          output_names=list(output_names), dynamic_axes=axes, opset_version=OPSET)
    tmp.replace(path)
    save_safetensors(module, path.with_suffix(".safetensors"))
    generator = torch.Generator().manual_seed(seed)
    check = [torch.rand((check_batch, *x.shape[1:]), generator=generator) for x in inputs]
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    got = session.run(list(output_names), {name: x.numpy() for name, x in zip(input_names, check)})
    with torch.no_grad():
        expected = module(*check)
    expected = expected if isinstance(expected, (tuple, list)) else (expected,)
    worst = 0.0
    for name, ort_out, ref in zip(output_names, got, expected):
        ref_np = ref.numpy()
        if ort_out.shape != ref_np.shape:
            raise ExportError(f"{path}: output {name!r} has shape {ort_out.shape} in onnxruntime, "
                              f"{ref_np.shape} in torch")
        diff = np.abs(ort_out - ref_np)
        worst = max(worst, float(diff.max(initial=0.0)))
        if not np.all(diff <= tolerance.atol + tolerance.rtol * np.abs(ref_np)):
            raise ExportError(f"{path}: onnxruntime's {name!r} differs from torch by up to {diff.max():.3g} "
                              f"(tolerance atol={tolerance.atol}, rtol={tolerance.rtol})")
    return {"onnx": path.name, "safetensors": path.with_suffix(".safetensors").name, "max_abs_diff": worst,
            "check_batch": check_batch}


def latency(module: nn.Module, onnx_path: Path, example: torch.Tensor, *, batch: int = 32,
            repeats: int = 5) -> dict[str, float]:
    """Median milliseconds per image of torch (eval, no grad) and onnxruntime on one batch."""
    import onnxruntime

    x = example[:1].expand(batch, *example.shape[1:]).contiguous()
    session = onnxruntime.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    feeds = {name: x.numpy()}

    def timed(fn: Callable[[], object]) -> float:
        fn()  # warm-up
        times = []
        for _ in range(repeats):
            tic = time.perf_counter()
            fn()
            times.append(time.perf_counter() - tic)
        return float(np.median(times)) * 1000 / batch

    with torch.no_grad():
        torch_ms = timed(lambda: module(x))
    return {"batch": batch, "torch_ms_per_image": torch_ms,
            "onnxruntime_ms_per_image": timed(lambda: session.run(None, feeds)),
            "torch_threads": torch.get_num_threads()}


def export_run(run: str | Path, out: str | Path, *, tolerance: Tolerance = Tolerance(),
               benchmark: bool = False) -> dict[str, Any]:
    """Write ``model.onnx``, ``model.safetensors`` and ``export.json`` of a run into ``out`` (atomically)."""
    model, backbone, description = build_run_model(run)
    prep = backbone.preprocessing
    example = torch.rand(2, prep.in_chans, prep.image_size, prep.image_size, generator=torch.Generator().manual_seed(1))
    with atomic_directory(out) as tmp:
        description["files"] = export_onnx(model, [example], tmp / "model.onnx", ["images"], ["logits"],
                                           tolerance=tolerance)
        if benchmark:
            description["latency"] = latency(model, tmp / "model.onnx", example)
        atomic_write_json(tmp / "export.json", description)
    return description


def _safe(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", name).strip("_") or "backbone"


def export_ensemble(folder: str | Path, out: str | Path, *, tolerance: Tolerance = Tolerance(),
                    benchmark: bool = False) -> dict[str, Any]:
    """Write the ensemble's encoders, heads and combination as ONNX + safetensors into ``out``.

    Raises:
        ExportError: A member without a known image size, or an export that disagrees with torch.
    """
    from polyclip.ensemble.artifact import load_ensemble

    ensemble = load_ensemble(folder)
    description: dict[str, Any] = {"kind": "ensemble", "ensemble": str(Path(folder).resolve()),
                                   "class_names": ensemble.class_names, "encoders": [], "heads": []}
    with atomic_directory(out) as tmp:
        for i, (info, head) in enumerate(zip(ensemble.backbones, ensemble.head_list)):
            if info.image_size is None:
                raise ExportError(f"ensemble member {info.name!r} has no image_size: its encoder cannot be rebuilt")
            in_chans = (info.preprocessing or {}).get("in_chans")
            # The factory applies the channels only where it builds the architecture from scratch.
            backbone = create_backbone(info.spec, image_size=info.image_size,
                                       in_chans=int(in_chans) if in_chans else None)
            prep = backbone.preprocessing
            encoder = EncoderModel(backbone).eval()
            images = torch.rand(2, prep.in_chans, prep.image_size, prep.image_size)
            stem = f"{i}_{_safe(info.name)}"
            files = export_onnx(encoder, [images], tmp / "encoders" / f"{stem}.onnx", ["images"], ["features"],
                                tolerance=tolerance)
            entry = {"name": info.name, "spec": info.spec, "num_features": info.num_features,
                     "input_shape": ["batch", prep.in_chans, prep.image_size, prep.image_size],
                     "preprocessing": {"mean": list(prep.mean), "std": list(prep.std)}, **files}
            if benchmark:
                entry["latency"] = latency(encoder, tmp / "encoders" / f"{stem}.onnx", images)
            description["encoders"].append(entry)
            head_files = export_onnx(head.eval(), [torch.randn(2, info.num_features)],
                                     tmp / "heads" / f"{stem}.onnx", ["features"], ["logits"], tolerance=tolerance)
            description["heads"].append({"name": info.name, "kind": head.kind, **head_files})
        names = [f"features_{i}" for i in range(ensemble.num_backbones)]
        example = [torch.randn(2, info.num_features) for info in ensemble.backbones]
        description["ensemble_model"] = {
            "inputs": names, "outputs": ["logits", "weights"],
            **export_onnx(EnsembleModel(ensemble).eval(), example, tmp / "ensemble.onnx", names,
                          ["logits", "weights"], tolerance=tolerance),
        }
        atomic_write_json(tmp / "export.json", description)
    return description


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Run the export; returns what ``export.json`` holds."""
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    parser = job_parser("python -m jobs.export", __doc__, config_help=None, address=False)
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--run", help="run directory written by jobs.train (probe, finetune, distill)")
    source.add_argument("--ensemble", help="ensemble artifact directory (ensemble.json, heads.pt, ...)")
    parser.add_argument("--out", required=True, help="output folder (replaced atomically)")
    parser.add_argument("--atol", type=float, default=Tolerance.atol, help="absolute tolerance of the check")
    parser.add_argument("--rtol", type=float, default=Tolerance.rtol, help="relative tolerance of the check")
    parser.add_argument("--benchmark", action="store_true", help="also time torch and onnxruntime per image")
    args = parser.parse_args(argv)
    tolerance = Tolerance(args.atol, args.rtol)
    with exit_on_error(ExportError, ValueError, FileNotFoundError):
        if args.run:
            result = export_run(args.run, args.out, tolerance=tolerance, benchmark=args.benchmark)
        else:
            result = export_ensemble(args.ensemble, args.out, tolerance=tolerance, benchmark=args.benchmark)
    print(f"exported to {Path(args.out).resolve()}")
    return result


if __name__ == "__main__":
    main(sys.argv[1:])
