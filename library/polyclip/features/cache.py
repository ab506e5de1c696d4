"""The feature cache: encode a split with a frozen backbone once, reuse it everywhere.

Probes, pseudo-label teachers, distillation targets and the ensemble all read features
from here. The key is a hash of (backbone spec, preprocessing, dataset fingerprint,
pool, indices), so a second identical run loads instead of re-encoding, and any change
that alters the features changes the key. Parallel encoding across a Ray cluster lives
in ``jobs/features.py``; this module is Ray-free.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from pathlib import Path

import numpy as np
import torch

from polyclip.backbones.base import Backbone
from polyclip.io import atomic_write_json, atomic_write_with
from polyclip.progress import Progress

logger = logging.getLogger(__name__)


def feature_key(backbone_spec: str, preprocessing_key: str, dataset_fingerprint: str, pool: str,
                indices: np.ndarray) -> str:
    """A cache key that changes whenever the features would."""
    digest = hashlib.sha256()
    for part in (backbone_spec, preprocessing_key, dataset_fingerprint, pool):
        digest.update(part.encode())
        digest.update(b"\0")
    digest.update(np.ascontiguousarray(indices, dtype=np.int64).tobytes())
    return digest.hexdigest()[:24]


class FeatureCache:
    """Features stored as ``<root>/<key>.npy`` with a ``<key>.json`` description.

    Args:
        root: Cache folder (created on first write).
    """

    def __init__(self, root: str | os.PathLike[str]) -> None:
        self.root = Path(root)

    def path(self, key: str) -> Path:
        return self.root / f"{key}.npy"

    def get(self, key: str) -> np.ndarray | None:
        """Cached features, or ``None``. A damaged entry is reported and treated as missing."""
        path = self.path(key)
        if not path.exists():
            return None
        try:
            return np.load(path, mmap_mode=None, allow_pickle=False)
        except (OSError, ValueError) as exc:
            logger.warning("feature cache entry %s is unreadable (%s); re-encoding", path, exc)
            return None

    def put(self, key: str, features: np.ndarray, meta: dict[str, object]) -> Path:
        """Store features (atomically) with their description."""

        def write(tmp: Path) -> None:
            with open(tmp, "wb") as handle:
                np.save(handle, features.astype(np.float32, copy=False), allow_pickle=False)

        atomic_write_with(self.path(key), write)
        atomic_write_json(self.root / f"{key}.json", {**meta, "shape": list(features.shape)})
        return self.path(key)


@torch.no_grad()
def encode_images(
    backbone: Backbone,
    images: np.ndarray,
    *,
    batch_size: int = 128,
    device: str | torch.device = "cpu",
    progress: Progress | None = None,
) -> np.ndarray:
    """Embed raw images with a frozen backbone.

    Args:
        backbone: Encoder (put in eval mode here).
        images: ``uint8`` ``(N, C, H, W)``.
        batch_size: Images per forward pass.
        device: Where to run.
        progress: Optional progress reporter, advanced per batch.

    Returns:
        ``float32`` ``(N, backbone.num_features)``.
    """
    backbone = backbone.eval().to(device)
    out = np.empty((len(images), backbone.num_features), dtype=np.float32)
    for start in range(0, len(images), batch_size):
        batch = torch.from_numpy(np.array(images[start : start + batch_size])).to(device)  # writable copy
        out[start : start + len(batch)] = backbone.encode(batch).float().cpu().numpy()
        if progress is not None:
            progress.update(len(batch))
    return out


def describe(backbone_spec: str, image_size: int, dataset_spec: str, pool: str, n: int) -> dict[str, object]:
    """The JSON description stored beside a cache entry."""
    return json.loads(json.dumps({
        "backbone": backbone_spec, "image_size": image_size, "dataset": dataset_spec, "pool": pool, "n": n,
    }))
