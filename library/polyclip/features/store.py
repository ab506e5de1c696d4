"""A sharded feature store on local, NFS or object storage.

Each entry lives under ``<root>/<key>/``::

    part-00000.npy   rows [0, S) as a float32 (rows, dim) array
    part-00000.json  that shard's receipt: rows, byte size, sha256
    ...
    index.json       written last: rows per shard, checksums, dim, dtype, description

A shard and its receipt are written as soon as the shard is complete (a temporary file
renamed into place on a filesystem, one PUT on an object store), so an interrupted encode
keeps its finished shards and the next run encodes only the missing ones. An entry counts
as present only once ``index.json`` exists. A zero-byte, truncated or checksum-mismatched
shard is never loaded: :meth:`FeatureStore.open` checks sizes, every read checks the
sha256, and :meth:`ShardWriter.missing_shards` lists damaged shards for re-encoding.

The root is a local path or a URI (``s3://bucket/prefix``, or anything
``pyarrow.fs.FileSystem.from_uri`` opens); S3 reads its endpoint from
``AWS_ENDPOINT_URL`` and its credentials from the usual AWS chain. Nothing here imports
Ray; :meth:`FeatureSet.to_ray_dataset` imports it when called.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import posixpath
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any
from urllib.parse import urlparse

import numpy as np

from polyclip.io import atomic_write_bytes

if TYPE_CHECKING:
    import pyarrow.fs as pafs
    import ray.data

logger = logging.getLogger(__name__)

INDEX_NAME = "index.json"
FORMAT = "polyclip.features/1"
DEFAULT_SHARD_ROWS = 4096
DTYPE = np.dtype(np.float32)


class ShardError(ValueError):
    """A shard that is missing, truncated or fails its checksum; the message names it."""


def shard_name(index: int) -> str:
    """``3 -> 'part-00003.npy'``."""
    return f"part-{index:05d}.npy"


def filesystem_for(root: str | os.PathLike[str]) -> tuple[pafs.FileSystem, str]:
    """The pyarrow filesystem and the path inside it for a store root.

    Args:
        root: A local or NFS path, ``s3://bucket/prefix``, or another URI pyarrow opens.

    Returns:
        ``(filesystem, path)``; local paths are made absolute.

    Raises:
        ValueError: A URI whose scheme pyarrow cannot open.
    """
    import pyarrow.fs as pafs

    text = os.fspath(root)
    parsed = urlparse(text)
    if parsed.scheme in {"", "file"} or len(parsed.scheme) == 1:  # one letter: a Windows drive
        path = parsed.path if parsed.scheme == "file" else text
        return pafs.LocalFileSystem(), os.path.abspath(os.path.expanduser(path))
    if parsed.scheme == "s3":
        return _s3_filesystem(), f"{parsed.netloc}{parsed.path}".rstrip("/")
    try:
        fs, path = pafs.FileSystem.from_uri(text)
    except (ValueError, OSError) as exc:  # pyarrow's ArrowInvalid is a ValueError
        raise ValueError(f"feature store root {text!r}: pyarrow cannot open this URI ({exc})") from exc
    return fs, path.rstrip("/")


def _s3_filesystem() -> pafs.S3FileSystem:
    import pyarrow.fs as pafs

    kwargs: dict[str, Any] = {}
    endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
    if endpoint:
        parsed = urlparse(endpoint if "://" in endpoint else f"https://{endpoint}")
        kwargs["endpoint_override"] = parsed.netloc
        kwargs["scheme"] = parsed.scheme
    region = os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION")
    if region:
        kwargs["region"] = region
    return pafs.S3FileSystem(**kwargs)


def _is_local(fs: pafs.FileSystem) -> bool:
    return fs.type_name == "local"


def _read_bytes(fs: pafs.FileSystem, path: str) -> bytes:
    with fs.open_input_stream(path, compression=None) as handle:
        return bytes(handle.read())


def _write_bytes(fs: pafs.FileSystem, path: str, data: bytes) -> None:
    """Write a whole file so that a reader sees either nothing or all of it."""
    if _is_local(fs):
        atomic_write_bytes(path, data)  # temporary sibling, fsync, rename
        return
    # An object store PUT is atomic by itself; a rename there is a copy.
    fs.create_dir(posixpath.dirname(path), recursive=True)
    with fs.open_output_stream(path, compression=None) as handle:
        handle.write(data)


def _npy_bytes(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, array, allow_pickle=False)
    return buffer.getvalue()


def _load_npy(data: bytes, where: str) -> np.ndarray:
    try:
        return np.load(io.BytesIO(data), allow_pickle=False)
    except (OSError, ValueError, EOFError) as exc:  # a zero-byte file raises EOFError
        raise ShardError(f"shard {where} is unreadable: {exc}") from exc


@dataclass(frozen=True)
class ShardInfo:
    """One shard of an entry: where its rows start, how many, its size and checksum."""

    name: str
    start: int
    rows: int
    bytes: int
    sha256: str

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "start": self.start, "rows": self.rows, "bytes": self.bytes,
                "sha256": self.sha256}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> ShardInfo:
        return cls(name=str(data["name"]), start=int(data["start"]), rows=int(data["rows"]),
                   bytes=int(data["bytes"]), sha256=str(data["sha256"]))


class FeatureSet:
    """A complete entry of the store: ``num_rows`` feature vectors of size ``dim``.

    Row ``i`` is the feature of the source's row ``i``. Reads go shard by shard and check
    each shard's sha256, so memory holds at most one shard beyond what the caller asks for.
    Picklable: Ray tasks can read it on any node that reaches the root.

    Args:
        fs: The store's filesystem.
        path: The entry's folder in ``fs``.
        index: The parsed ``index.json``.
    """

    def __init__(self, fs: pafs.FileSystem, path: str, index: dict[str, Any]) -> None:
        self.fs, self.path, self.index = fs, path, index
        self.shards = [ShardInfo.from_json(s) for s in index["shards"]]
        self._starts = np.array([s.start for s in self.shards], dtype=np.int64)

    @property
    def key(self) -> str:
        return str(self.index["key"])

    @property
    def num_rows(self) -> int:
        return int(self.index["num_rows"])

    @property
    def dim(self) -> int:
        return int(self.index["dim"])

    @property
    def dtype(self) -> np.dtype[Any]:
        return np.dtype(self.index["dtype"])

    @property
    def description(self) -> dict[str, Any]:
        return dict(self.index.get("description", {}))

    def __len__(self) -> int:
        return self.num_rows

    def __repr__(self) -> str:
        return f"FeatureSet({self.path!r}, num_rows={self.num_rows}, dim={self.dim}, shards={len(self.shards)})"

    def read_shard(self, number: int) -> np.ndarray:
        """One shard's ``(rows, dim)`` array, checked against its size and sha256.

        Raises:
            ShardError: The shard is missing, truncated or fails its checksum.
        """
        info = self.shards[number]
        where = posixpath.join(self.path, info.name)
        try:
            data = _read_bytes(self.fs, where)
        except (OSError, FileNotFoundError) as exc:
            raise ShardError(f"shard {where} cannot be read: {exc}") from exc
        if len(data) != info.bytes:
            raise ShardError(f"shard {where} has {len(data)} bytes, the index says {info.bytes} (truncated?)")
        digest = hashlib.sha256(data).hexdigest()
        if digest != info.sha256:
            raise ShardError(f"shard {where} fails its checksum (sha256 {digest[:12]}..., index {info.sha256[:12]}...)")
        array = _load_npy(data, where)
        if array.shape != (info.rows, self.dim):
            raise ShardError(f"shard {where} has shape {array.shape}, expected {(info.rows, self.dim)}")
        return array

    def to_numpy(self, rows: np.ndarray | None = None, *, max_bytes: int = 4 << 30) -> np.ndarray:
        """Features of ``rows`` (all rows if ``None``) as one in-memory array.

        Meant for small sets (labeled, validation, a probe's training rows); a pool is read
        with :meth:`iter_batches` or :meth:`to_ray_dataset`.

        Args:
            rows: Row numbers, any order, repeats allowed.
            max_bytes: Refuse results larger than this.

        Raises:
            ValueError: A row outside ``[0, num_rows)``, or a result over ``max_bytes``.
            ShardError: A shard that fails its checks.
        """
        wanted = np.arange(self.num_rows) if rows is None else np.asarray(rows, dtype=np.int64).reshape(-1)
        if wanted.size and (wanted.min() < 0 or wanted.max() >= self.num_rows):
            bad = wanted[(wanted < 0) | (wanted >= self.num_rows)][0]
            raise ValueError(f"row {int(bad)} is outside this feature set's {self.num_rows} rows")
        size = wanted.size * self.dim * self.dtype.itemsize
        if size > max_bytes:
            raise ValueError(f"{wanted.size} rows x {self.dim} would take {size / 2**30:.1f} GiB "
                             f"(max_bytes={max_bytes}); read them with iter_batches or to_ray_dataset")
        out = np.empty((wanted.size, self.dim), dtype=self.dtype)
        owner = np.searchsorted(self._starts, wanted, side="right") - 1
        for number in np.unique(owner):
            take = owner == number
            out[take] = self.read_shard(int(number))[wanted[take] - self.shards[number].start]
        return out

    def iter_batches(self, batch_rows: int = 4096) -> Iterator[dict[str, np.ndarray]]:
        """Yield ``{"row": int64 (n,), "features": (n, dim)}`` in row order, ``n <= batch_rows``.

        Raises:
            ValueError: ``batch_rows`` below 1.
            ShardError: A shard that fails its checks.
        """
        if batch_rows < 1:
            raise ValueError(f"batch_rows must be at least 1, got {batch_rows}")
        pending: list[np.ndarray] = []
        pending_rows = 0
        next_row = 0
        for number in range(len(self.shards)):
            pending.append(self.read_shard(number))
            pending_rows += len(pending[-1])
            while pending_rows >= batch_rows:
                merged = np.concatenate(pending) if len(pending) > 1 else pending[0]
                yield {"row": np.arange(next_row, next_row + batch_rows, dtype=np.int64),
                       "features": merged[:batch_rows]}
                next_row += batch_rows
                pending, pending_rows = [merged[batch_rows:]], pending_rows - batch_rows
        if pending_rows:
            merged = np.concatenate(pending)
            yield {"row": np.arange(next_row, next_row + pending_rows, dtype=np.int64), "features": merged}

    def to_ray_dataset(self) -> ray.data.Dataset:
        """A lazy Ray Dataset of rows ``{"row": int64, "features": float32 (dim,)}``.

        Each shard is read (and checked) by a Ray task, so the root must be reachable from
        every node: a shared filesystem or an object store.
        """
        import ray.data

        items = [{"shard": number} for number in range(len(self.shards))]
        ds = ray.data.from_items(items, override_num_blocks=max(1, len(items)))
        return ds.map_batches(_ShardReader(self), batch_size=1, batch_format="numpy")


class _ShardReader:
    """Reads the shards named in a batch of ``{"shard": int}`` rows (a Ray task per block)."""

    def __init__(self, feature_set: FeatureSet) -> None:
        self.feature_set = feature_set

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        rows, feats = [], []
        for number in batch["shard"]:
            info = self.feature_set.shards[int(number)]
            feats.append(self.feature_set.read_shard(int(number)))
            rows.append(np.arange(info.start, info.start + info.rows, dtype=np.int64))
        return {"row": np.concatenate(rows), "features": np.concatenate(feats)}


class ShardWriter:
    """Writes one entry shard by shard; :meth:`finish` writes the index last.

    Shard ``i`` holds rows ``[i * shard_rows, min((i + 1) * shard_rows, num_rows))``.

    Args:
        store: The store.
        key: Entry name.
        description: Stored in the index (backbone, dataset, pool...).
        num_rows: Rows the entry will hold.
        shard_rows: Rows per shard.
    """

    def __init__(self, store: FeatureStore, key: str, description: dict[str, Any], num_rows: int,
                 shard_rows: int) -> None:
        if num_rows < 0:
            raise ValueError(f"num_rows must be >= 0, got {num_rows}")
        if shard_rows < 1:
            raise ValueError(f"shard_rows must be at least 1, got {shard_rows}")
        self.store, self.key, self.description = store, key, description
        self.num_rows, self.shard_rows = num_rows, shard_rows
        self.path = store.entry_path(key)
        self.dim: int | None = None
        self._done: dict[int, ShardInfo] = {}
        self._checked = False

    @property
    def num_shards(self) -> int:
        return -(-self.num_rows // self.shard_rows) if self.num_rows else 0

    def bounds(self, number: int) -> tuple[int, int]:
        """``(start, stop)`` rows of shard ``number``."""
        if not 0 <= number < max(self.num_shards, 1):
            raise ValueError(f"shard {number} is outside 0..{self.num_shards - 1}")
        start = number * self.shard_rows
        return start, min(start + self.shard_rows, self.num_rows)

    def missing_shards(self) -> list[int]:
        """Shards still to encode: absent ones, and damaged ones (with a warning naming each).

        Reads every finished shard once to check its checksum against its receipt.
        """
        fs = self.store.fs
        self._done.clear()
        missing: list[int] = []
        for number in range(self.num_shards):
            info = self._check_finished(number)
            if info is None:
                missing.append(number)
            else:
                self._done[number] = info
        self._checked = True
        if self._done and missing:
            logger.info("feature store %s: %d of %d shards already encoded; encoding %d", self.path,
                        len(self._done), self.num_shards, len(missing))
        if missing and fs.get_file_info(posixpath.join(self.path, INDEX_NAME)).type != _not_found():
            # The entry is being repaired: hide it from readers until the new index is written.
            fs.delete_file(posixpath.join(self.path, INDEX_NAME))
        return missing

    def _check_finished(self, number: int) -> ShardInfo | None:
        fs = self.store.fs
        name = shard_name(number)
        shard_path = posixpath.join(self.path, name)
        receipt_path = shard_path[: -len(".npy")] + ".json"
        start, stop = self.bounds(number)
        if fs.get_file_info(shard_path).type == _not_found():
            return None
        try:
            receipt = json.loads(_read_bytes(fs, receipt_path))
            info = ShardInfo.from_json(receipt)
            data = _read_bytes(fs, shard_path)
        except (OSError, ValueError, KeyError, TypeError) as exc:
            logger.warning("feature store: shard %s has no valid receipt (%s); re-encoding it", shard_path, exc)
            return None
        reason = None
        if (info.start, info.rows) != (start, stop - start):
            reason = f"holds rows {info.start}..{info.start + info.rows}, expected {start}..{stop}"
        elif len(data) != info.bytes:
            reason = f"has {len(data)} bytes, its receipt says {info.bytes} (zero-byte or truncated)"
        elif hashlib.sha256(data).hexdigest() != info.sha256:
            reason = "fails its sha256 checksum"
        else:
            try:
                array = _load_npy(data, shard_path)
            except ShardError as exc:
                reason = str(exc)
            else:
                dim = int(receipt.get("dim", array.shape[-1]))
                if array.dtype != DTYPE or array.shape != (info.rows, dim) or self.dim not in (None, dim):
                    reason = f"has shape {array.shape} {array.dtype}, expected ({info.rows}, {self.dim or dim}) float32"
                else:
                    self.dim = dim
        if reason is not None:
            logger.warning("feature store: shard %s %s; re-encoding it", shard_path, reason)
            return None
        return info

    def write_shard(self, number: int, features: np.ndarray) -> ShardInfo:
        """Write shard ``number`` (and its receipt) atomically.

        Raises:
            ValueError: Wrong number of rows, a dim that differs from earlier shards, or
                non-finite values.
        """
        start, stop = self.bounds(number)
        array = np.ascontiguousarray(features, dtype=DTYPE)
        if array.ndim != 2 or array.shape[0] != stop - start:
            raise ValueError(f"shard {number} of {self.key} needs ({stop - start}, dim) features, got {array.shape}")
        if self.dim is not None and array.shape[1] != self.dim:
            raise ValueError(f"shard {number} of {self.key} has dim {array.shape[1]}, earlier shards {self.dim}")
        if not np.isfinite(array).all():
            raise ValueError(f"shard {number} of {self.key} (rows {start}..{stop}) holds non-finite features")
        self.dim = int(array.shape[1])
        data = _npy_bytes(array)
        info = ShardInfo(name=shard_name(number), start=start, rows=stop - start, bytes=len(data),
                         sha256=hashlib.sha256(data).hexdigest())
        shard_path = posixpath.join(self.path, info.name)
        _write_bytes(self.store.fs, shard_path, data)
        receipt = {**info.to_json(), "dim": self.dim, "dtype": DTYPE.name}
        _write_bytes(self.store.fs, shard_path[: -len(".npy")] + ".json", json.dumps(receipt).encode())
        self._done[number] = info
        return info

    def finish(self, dim: int | None = None) -> FeatureSet:
        """Write ``index.json`` once every shard is in place, and return the entry.

        Args:
            dim: The feature size, needed only for an entry of zero rows.

        Raises:
            ValueError: Shards still missing.
        """
        if not self._checked and len(self._done) < self.num_shards:
            self.missing_shards()
        absent = [n for n in range(self.num_shards) if n not in self._done]
        if absent:
            raise ValueError(f"cannot finish {self.key}: shards {absent[:10]} of {self.num_shards} are not written")
        dim = self.dim if self.dim is not None else dim
        if dim is None:
            raise ValueError(f"cannot finish {self.key}: an empty entry needs its dim")
        index = {
            "format": FORMAT, "key": self.key, "num_rows": self.num_rows, "dim": int(dim), "dtype": DTYPE.name,
            "shard_rows": self.shard_rows, "description": self.description,
            "shards": [self._done[n].to_json() for n in range(self.num_shards)],
        }
        _write_bytes(self.store.fs, posixpath.join(self.path, INDEX_NAME),
                     json.dumps(index, indent=1, default=_json_default).encode())
        return FeatureSet(self.store.fs, self.path, index)


def _json_default(value: Any) -> Any:
    if isinstance(value, np.generic):
        return value.item()
    raise TypeError(f"cannot store {type(value).__name__} in a feature index")


def _not_found() -> Any:
    import pyarrow.fs as pafs

    return pafs.FileType.NotFound


class FeatureStore:
    """Feature entries under one root: local, NFS, ``s3://`` or another pyarrow URI.

    Args:
        root: Where entries live.
        filesystem: Use this pyarrow filesystem, ``root`` being a path inside it (tests,
            custom credentials); by default it is derived from ``root``.
        shard_rows: Default rows per shard for new entries.

    Example:
        >>> store = FeatureStore("/tmp/features")                     # doctest: +SKIP
        >>> store.write_array("k", feats, {"backbone": "x"}).num_rows  # doctest: +SKIP
    """

    def __init__(self, root: str | os.PathLike[str], *, filesystem: pafs.FileSystem | None = None,
                 shard_rows: int = DEFAULT_SHARD_ROWS) -> None:
        self.root = os.fspath(root)
        if filesystem is None:
            self.fs, self.base = filesystem_for(self.root)
        else:
            self.fs, self.base = filesystem, self.root.rstrip("/")
        if shard_rows < 1:
            raise ValueError(f"shard_rows must be at least 1, got {shard_rows}")
        self.shard_rows = shard_rows

    def __repr__(self) -> str:
        return f"FeatureStore({self.root!r})"

    def entry_path(self, key: str) -> str:
        """The folder of entry ``key`` inside the filesystem."""
        if not key or "/" in key or key.startswith("."):
            raise ValueError(f"feature key {key!r} must be a plain, non-empty name")
        return posixpath.join(self.base, key)

    def uri(self, key: str) -> str:
        """Where entry ``key`` lives, for logs."""
        return f"{self.root.rstrip('/')}/{key}"

    def open(self, key: str) -> FeatureSet | None:
        """The complete entry ``key``, or ``None`` if it is absent or damaged.

        Checks the index and every shard's size (one listing call); checksums are checked
        as shards are read. A damaged entry is reported by shard and treated as missing.
        """
        import pyarrow.fs as pafs

        path = self.entry_path(key)
        index_path = posixpath.join(path, INDEX_NAME)
        try:
            index = json.loads(_read_bytes(self.fs, index_path))
            entry = FeatureSet(self.fs, path, index)
        except FileNotFoundError:
            return None
        except (OSError, ValueError, KeyError, TypeError) as exc:
            if self.fs.get_file_info(index_path).type == pafs.FileType.NotFound:
                return None
            logger.warning("feature store: index %s is unreadable (%s); re-encoding", index_path, exc)
            return None
        infos = self.fs.get_file_info([posixpath.join(path, s.name) for s in entry.shards])
        for shard, file in zip(entry.shards, infos, strict=True):
            if file.type == pafs.FileType.NotFound or file.size != shard.bytes:
                size = "missing" if file.type == pafs.FileType.NotFound else f"{file.size} bytes"
                logger.warning("feature store: shard %s is %s, the index says %d bytes; re-encoding",
                               file.path, size, shard.bytes)
                return None
        return entry

    def writer(self, key: str, description: dict[str, Any], num_rows: int,
               shard_rows: int | None = None) -> ShardWriter:
        """A writer for entry ``key``; call :meth:`ShardWriter.missing_shards` to resume."""
        return ShardWriter(self, key, description, num_rows, shard_rows or self.shard_rows)

    def write_array(self, key: str, features: np.ndarray, description: dict[str, Any]) -> FeatureSet:
        """Store an in-memory ``(N, dim)`` array as entry ``key`` (replacing any old one)."""
        array = np.asarray(features)
        if array.ndim != 2:
            raise ValueError(f"features for {key!r} must be (N, dim), got shape {array.shape}")
        writer = self.writer(key, description, len(array))
        for number in range(writer.num_shards):
            start, stop = writer.bounds(number)
            writer.write_shard(number, array[start:stop])
        return writer.finish(dim=array.shape[1])

    def encode(self, key: str, description: dict[str, Any], num_rows: int,
               encode_rows: Callable[[int, int], np.ndarray], *, shard_rows: int | None = None) -> FeatureSet:
        """Encode in process, shard by shard, only the shards the entry is missing.

        Args:
            key: Entry name.
            description: Stored in the index.
            num_rows: Rows of the source.
            encode_rows: ``(start, stop) -> (stop - start, dim)`` features of those rows.
            shard_rows: Rows per shard (default: the store's).
        """
        writer = self.writer(key, description, num_rows, shard_rows)
        for number in writer.missing_shards():
            writer.write_shard(number, encode_rows(*writer.bounds(number)))
        return writer.finish()
