"""The feature cache: encode a split with a frozen backbone once, reuse it everywhere.

Probes, pseudo-label teachers, distillation targets and the ensemble all read features
from here. The key is a hash of (backbone spec, preprocessing, dataset fingerprint,
pool, indices), so a second identical run loads instead of re-encoding, and any change
that alters the features changes the key. Entries live in the sharded
:class:`~polyclip.features.store.FeatureStore`. Encoding through Ray Data across a
cluster lives in ``jobs/features.py``; this module is Ray-free.
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
from polyclip.features.store import FeatureStore, ShardError
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
    """The feature store at ``root``, with the whole-array ``get``/``put`` of the old cache.

    Entries are sharded folders (:class:`~polyclip.features.store.FeatureStore`); a
    ``<root>/<key>.npy`` left by an older polyclip is still read.

    Args:
        root: Cache folder or URI (``s3://bucket/prefix``); created on first write.
    """

    def __init__(self, root: str | os.PathLike[str]) -> None:
        self.store = FeatureStore(root)
        self.root = self.store.root

    def path(self, key: str) -> str:
        """Where entry ``key`` lives (a folder of shards), for logs."""
        return self.store.uri(key)

    def get(self, key: str) -> np.ndarray | None:
        """Cached features, or ``None``. A damaged entry is reported and treated as missing."""
        entry = self.store.open(key)
        if entry is not None:
            try:
                return entry.to_numpy()
            except ShardError as exc:
                logger.warning("feature cache entry %s is damaged (%s); re-encoding", self.path(key), exc)
                return None
        return self.legacy_get(key)

    def legacy_get(self, key: str) -> np.ndarray | None:
        """An old single-file entry ``<root>/<key>.npy`` on a local root, or ``None``."""
        if self.store.fs.type_name != "local":
            return None
        path = Path(self.store.base) / f"{key}.npy"
        if not path.is_file():
            return None
        try:
            return np.load(path, allow_pickle=False)
        except (OSError, ValueError, EOFError) as exc:  # a zero-byte file raises EOFError
            logger.warning("feature cache entry %s is unreadable (%s); re-encoding", path, exc)
            return None

    def put(self, key: str, features: np.ndarray, meta: dict[str, object]) -> str:
        """Store features (shard by shard, index last) with their description."""
        self.store.write_array(key, np.asarray(features, dtype=np.float32), dict(meta))
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
