"""The ensemble artifact: a directory serving loads without any training code.

Layout (written atomically with :func:`polyclip.io.atomic_directory`)::

    <dir>/ensemble.json          format version, backbones in cost order (spec, image
                                 size, preprocessing, feature dim), class names, head
                                 kinds, combiner options, cascade prefixes, protocol and
                                 training metadata, SHA-256 of the two tensor files
    <dir>/heads.safetensors      per backbone ``b``: ``b.weight`` (C, D), ``b.bias`` (C,),
                                 ``b.logit_scale`` ()
    <dir>/combiner.safetensors   per cascade prefix ``k``: ``k.<state dict key>``

Tensors are stored as safetensors (format 2): loading them runs no code, unlike a pickle.
Format 1 artifacts (``heads.pt``, ``combiner.pt``) are still read, with
``torch.load(weights_only=True)``. Every tensor file's SHA-256 is checked against
``ensemble.json`` before it is read; a missing checksum is an error. Anything missing,
truncated or inconsistent raises :class:`EnsembleArtifactError` naming the file and the
problem.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from polyclip.ensemble.combiner import TemperatureCombiner
from polyclip.ensemble.heads import LinearHead
from polyclip.ensemble.model import BackboneInfo, Ensemble
from polyclip.io import atomic_directory

FORMAT_VERSION = 2
JSON_FILE, HEADS_FILE, COMBINER_FILE = "ensemble.json", "heads.safetensors", "combiner.safetensors"
#: Tensor files of each format version this polyclip reads.
TENSOR_FILES = {1: ("heads.pt", "combiner.pt"), 2: (HEADS_FILE, COMBINER_FILE)}


class EnsembleArtifactError(ValueError):
    """An ensemble directory is missing, incomplete, corrupt or inconsistent."""


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def save_ensemble(path: str | os.PathLike[str], ensemble: Ensemble) -> Path:
    """Write ``ensemble`` as an artifact directory (replacing ``path`` atomically).

    Args:
        path: Target directory.
        ensemble: The fitted ensemble; its ``metadata`` is stored under ``"metadata"``.

    Returns:
        ``path``.
    """
    heads = {f"{b}.{name}": tensor.detach().cpu().contiguous().clone()
             for b, h in enumerate(ensemble.head_list)
             for name, tensor in (("weight", h.weight), ("bias", h.bias), ("logit_scale", h.logit_scale))}
    combiners = {f"{c.num_backbones}.{key}": tensor.detach().cpu().contiguous().clone()
                 for c in ensemble.combiner_list for key, tensor in c.state_dict().items()}
    with atomic_directory(path) as tmp:
        save_file(heads, str(tmp / HEADS_FILE))
        save_file(combiners, str(tmp / COMBINER_FILE))
        meta = {
            "format_version": FORMAT_VERSION,
            "backbones": [b.to_dict() for b in ensemble.backbones],
            "class_names": ensemble.class_names,
            "head_kinds": [h.kind for h in ensemble.head_list],
            "combiners": [c.config() for c in ensemble.combiner_list],
            "cascade_prefixes": ensemble.cascade_prefixes,
            "weights_meaning": "normalised 1/t (divide) or w (multiply) per backbone, summing to 1 per image",
            "metadata": ensemble.metadata,
            "sha256": {HEADS_FILE: _sha256(tmp / HEADS_FILE), COMBINER_FILE: _sha256(tmp / COMBINER_FILE)},
        }
        (tmp / JSON_FILE).write_text(json.dumps(meta, indent=2, default=_json_default) + "\n")
        for name in (HEADS_FILE, COMBINER_FILE, JSON_FILE):  # the directory rename is atomic, make contents durable
            with open(tmp / name, "rb") as handle:
                os.fsync(handle.fileno())
    return Path(path)


def _json_default(value: Any) -> Any:
    if hasattr(value, "tolist"):
        return value.tolist()
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"ensemble metadata holds a {type(value).__name__}, which JSON cannot store")


def _read_json(folder: Path) -> dict[str, Any]:
    if not folder.is_dir():
        raise EnsembleArtifactError(f"ensemble directory {folder} does not exist")
    file = folder / JSON_FILE
    if not file.is_file():
        raise EnsembleArtifactError(f"{file} is missing: {folder} is not an ensemble artifact")
    try:
        meta = json.loads(file.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise EnsembleArtifactError(f"{file} is unreadable or not valid JSON: {exc}") from exc
    if not isinstance(meta, dict):
        raise EnsembleArtifactError(f"{file} must hold a JSON object")
    missing = [k for k in ("format_version", "backbones", "class_names", "head_kinds", "combiners", "sha256")
               if k not in meta]
    if missing:
        raise EnsembleArtifactError(f"{file} lacks keys {missing}")
    if meta["format_version"] not in TENSOR_FILES:
        raise EnsembleArtifactError(f"{file}: format_version {meta['format_version']!r} is not supported "
                                    f"(this polyclip reads {sorted(TENSOR_FILES)})")
    if not isinstance(meta["sha256"], dict):
        raise EnsembleArtifactError(f"{file}: sha256 must map file names to checksums")
    return meta


def _load_tensors(folder: Path, name: str, expected_sha: Any) -> Any:
    file = folder / name
    if not file.is_file():
        raise EnsembleArtifactError(f"{file} is missing from the ensemble artifact")
    if not isinstance(expected_sha, str) or not expected_sha:
        raise EnsembleArtifactError(f"{folder / JSON_FILE} has no SHA-256 for {name}: refusing to load an "
                                    "unchecked tensor file")
    if _sha256(file) != expected_sha:
        raise EnsembleArtifactError(f"{file} is corrupt: its SHA-256 differs from the one in {JSON_FILE}")
    try:
        if name.endswith(".safetensors"):
            return load_file(str(file), device="cpu")
        return torch.load(file, map_location="cpu", weights_only=True)  # format 1: no arbitrary pickles
    except Exception as exc:  # torch and safetensors raise many types for damaged files
        raise EnsembleArtifactError(f"{file} cannot be loaded: {type(exc).__name__}: {exc}") from exc


def _split_v2(heads_flat: dict[str, torch.Tensor], combiners_flat: dict[str, torch.Tensor],
              n_heads: int) -> tuple[list[dict[str, torch.Tensor]], dict[str, dict[str, torch.Tensor]]]:
    """Format 2's flat ``b.name`` / ``k.key`` tensors -> format 1's heads list and combiners dict."""
    heads = [{name: heads_flat[f"{b}.{name}"] for name in ("weight", "bias", "logit_scale")} for b in range(n_heads)]
    extra = sorted(set(heads_flat) - {f"{b}.{n}" for b in range(n_heads) for n in ("weight", "bias", "logit_scale")})
    if extra:
        raise KeyError(f"unexpected head tensors {extra}")
    combiners: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in combiners_flat.items():
        prefix, _, name = key.partition(".")
        combiners.setdefault(prefix, {})[name] = tensor
    return heads, combiners


def load_ensemble(path: str | os.PathLike[str]) -> Ensemble:
    """Load an artifact written by :func:`save_ensemble` (format 2, or format 1's ``.pt`` files).

    Raises:
        EnsembleArtifactError: Missing directory or file, invalid JSON, checksum mismatch,
            unreadable tensors, or tensors that do not fit the description.
    """
    folder = Path(path)
    meta = _read_json(folder)
    version = meta["format_version"]
    heads_name, combiner_name = TENSOR_FILES[version]
    heads_raw = _load_tensors(folder, heads_name, meta["sha256"].get(heads_name))
    combiners_raw = _load_tensors(folder, combiner_name, meta["sha256"].get(combiner_name))
    try:
        if version >= 2:
            heads_raw, combiners_raw = _split_v2(heads_raw, combiners_raw, len(meta["head_kinds"]))
        backbones = [BackboneInfo.from_dict(b) for b in meta["backbones"]]
        heads = [LinearHead(h["weight"], h["bias"], float(h["logit_scale"]), kind=kind)
                 for h, kind in zip(heads_raw, meta["head_kinds"], strict=True)]
        combiners = []
        for config in meta["combiners"]:
            combiner = TemperatureCombiner(config["feature_dims"], hidden=config["hidden"], combine=config["combine"],
                                           positivity=config["positivity"], feature_norm=config["feature_norm"],
                                           eps=config["eps"])
            combiner.load_state_dict(combiners_raw[str(combiner.num_backbones)], strict=True)
            combiners.append(combiner)
        return Ensemble(backbones, meta["class_names"], heads, combiners, metadata=meta.get("metadata", {}))
    except (KeyError, TypeError, ValueError, RuntimeError) as exc:
        raise EnsembleArtifactError(f"{folder}: the artifact's files do not fit together: "
                                    f"{type(exc).__name__}: {exc}") from exc
