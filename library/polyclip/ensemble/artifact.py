"""The ensemble artifact: a directory serving loads without any training code.

Layout (written atomically with :func:`polyclip.io.atomic_directory`)::

    <dir>/ensemble.json   format version, backbones in cost order (spec, image size,
                          preprocessing, feature dim), class names, head kinds, combiner
                          options, cascade prefixes, protocol and training metadata,
                          SHA-256 of the two tensor files
    <dir>/heads.pt        per backbone: weight (C, D), bias (C,), logit_scale ()
    <dir>/combiner.pt     per cascade prefix k: the combiner's state dict

Tensor files are loaded with ``weights_only=True``. Anything missing, truncated or
inconsistent raises :class:`EnsembleArtifactError` naming the file and the problem.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

import torch

from polyclip.ensemble.combiner import TemperatureCombiner
from polyclip.ensemble.heads import LinearHead
from polyclip.ensemble.model import BackboneInfo, Ensemble
from polyclip.io import atomic_directory

FORMAT_VERSION = 1
JSON_FILE, HEADS_FILE, COMBINER_FILE = "ensemble.json", "heads.pt", "combiner.pt"


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
    heads = [{"weight": h.weight.detach().cpu().clone(), "bias": h.bias.detach().cpu().clone(),
              "logit_scale": h.logit_scale.detach().cpu().clone()} for h in ensemble.head_list]
    combiners = {str(c.num_backbones): c.state_dict() for c in ensemble.combiner_list}
    with atomic_directory(path) as tmp:
        torch.save(heads, tmp / HEADS_FILE)
        torch.save(combiners, tmp / COMBINER_FILE)
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
    if meta["format_version"] != FORMAT_VERSION:
        raise EnsembleArtifactError(f"{file}: format_version {meta['format_version']} is not supported "
                                    f"(this polyclip reads {FORMAT_VERSION})")
    return meta


def _load_tensors(folder: Path, name: str, expected_sha: str | None) -> Any:
    file = folder / name
    if not file.is_file():
        raise EnsembleArtifactError(f"{file} is missing from the ensemble artifact")
    if expected_sha is not None and _sha256(file) != expected_sha:
        raise EnsembleArtifactError(f"{file} is corrupt: its SHA-256 differs from the one in {JSON_FILE}")
    try:
        return torch.load(file, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises many types for damaged pickles/zips
        raise EnsembleArtifactError(f"{file} cannot be loaded: {type(exc).__name__}: {exc}") from exc


def load_ensemble(path: str | os.PathLike[str]) -> Ensemble:
    """Load an artifact written by :func:`save_ensemble`.

    Raises:
        EnsembleArtifactError: Missing directory or file, invalid JSON, checksum mismatch,
            unreadable tensors, or tensors that do not fit the description.
    """
    folder = Path(path)
    meta = _read_json(folder)
    heads_raw = _load_tensors(folder, HEADS_FILE, meta["sha256"].get(HEADS_FILE))
    combiners_raw = _load_tensors(folder, COMBINER_FILE, meta["sha256"].get(COMBINER_FILE))
    try:
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
