"""Image sources: listings of image files on local disk, NFS, S3 or any fsspec filesystem.

A source is a table of files, never their pixels: ``path`` (a full URI, or an absolute
local path, that :func:`open_file` reads), ``label`` (the class-folder name, or null for
unlabeled images), ``size`` (bytes) and ``mtime_ns``. Listing reads directory entries
only, one class folder (or top-level sub-folder) per thread, so a bucket of millions of
photos is listed without touching a pixel; decoding happens later, in Ray Data tasks
(``jobs/ingest.py``).

Sources come in two forms:

- an image folder: ``<root>/<class>/<file>`` when labeled, or a flat (possibly nested)
  folder or prefix of images when unlabeled;
- a manifest: a CSV or Parquet file with a ``path`` column (and ``label`` when labeled);
  relative paths are resolved against the manifest's folder.

S3 is reached through ``pyarrow.fs.S3FileSystem``, configured from the usual environment:
``AWS_ENDPOINT_URL`` (or ``POLYCLIP_S3_ENDPOINT``) for a non-AWS endpoint,
``AWS_ACCESS_KEY_ID`` / ``AWS_SECRET_ACCESS_KEY`` / ``AWS_SESSION_TOKEN`` for keys (else
the AWS default chain: profile, instance role), ``AWS_REGION``, and
``POLYCLIP_S3_ANONYMOUS=1`` for public buckets. Other schemes (``gs://``, ``abfs://``...)
go through fsspec when it and the scheme's driver are installed.

Example:
    >>> table = open_source("imagefolder:s3://photos/train", labeled=True)  # doctest: +SKIP
    >>> table.column_names
    ['path', 'label', 'size', 'mtime_ns']
"""

from __future__ import annotations

import hashlib
import logging
import os
import posixpath
from collections.abc import Iterable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from pyarrow import fs as pafs

from polyclip.data.images import IMAGE_EXTENSIONS

logger = logging.getLogger(__name__)

#: Columns of every source table.
SOURCE_SCHEMA = pa.schema(
    [
        pa.field("path", pa.string(), nullable=False),
        pa.field("label", pa.string()),
        pa.field("size", pa.int64()),
        pa.field("mtime_ns", pa.int64()),
    ]
)
#: Subsets a split manifest may hold.
SPLIT_SUBSETS = ("labeled", "val", "test", "unlabeled")
MANIFEST_SUFFIXES = (".csv", ".parquet", ".pq")
#: Threads listing folders or statting manifest entries (I/O bound: more than the cores).
LIST_THREADS = 16
#: How many offending rows an error message shows.
SHOWN_ROWS = 10


class SourceError(ValueError):
    """A source URI, manifest or storage location is unusable; the message says which and why."""


# --------------------------------------------------------------------------- filesystems


@dataclass(frozen=True)
class S3Options:
    """How to reach S3: endpoint, region and credentials, read from the environment.

    Captured once on the driver and shipped to Ray tasks (whose environment may differ)
    by ``jobs/ingest.py``. The secret never appears in ``repr``.

    Attributes:
        endpoint: ``http(s)://host:port`` of an S3-compatible server, or None for AWS.
        region: Region name.
        access_key: Access key id, or None for the default chain or anonymous access.
        secret_key: Secret key.
        session_token: Session token of temporary credentials.
        anonymous: Unsigned requests (public buckets).
    """

    endpoint: str | None = None
    region: str = "us-east-1"
    access_key: str | None = None
    secret_key: str | None = field(default=None, repr=False)
    session_token: str | None = field(default=None, repr=False)
    anonymous: bool = False

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> S3Options:
        """Read the options from ``environ`` (default: ``os.environ``)."""
        env = os.environ if environ is None else environ
        return cls(
            endpoint=env.get("POLYCLIP_S3_ENDPOINT") or env.get("AWS_ENDPOINT_URL_S3") or env.get("AWS_ENDPOINT_URL"),
            region=env.get("AWS_REGION") or env.get("AWS_DEFAULT_REGION") or "us-east-1",
            access_key=env.get("AWS_ACCESS_KEY_ID") or None,
            secret_key=env.get("AWS_SECRET_ACCESS_KEY") or None,
            session_token=env.get("AWS_SESSION_TOKEN") or None,
            anonymous=env.get("POLYCLIP_S3_ANONYMOUS", "").lower() in {"1", "true", "yes"},
        )

    @property
    def credential_source(self) -> str:
        """Where the credentials come from, in words (for error messages)."""
        if self.anonymous:
            return "anonymous access (POLYCLIP_S3_ANONYMOUS=1)"
        if self.access_key:
            return "AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY from the environment"
        return "the AWS default credential chain (AWS_PROFILE, ~/.aws, instance role); no AWS_ACCESS_KEY_ID set"

    def filesystem(self) -> pafs.S3FileSystem:
        """A ``pyarrow.fs.S3FileSystem`` with these options."""
        kwargs: dict[str, object] = {"region": self.region}
        if self.endpoint:
            scheme, _, host = self.endpoint.partition("://")
            if not host:
                scheme, host = "https", self.endpoint
            kwargs["endpoint_override"] = host.rstrip("/")
            kwargs["scheme"] = scheme
        if self.anonymous:
            kwargs["anonymous"] = True
        elif self.access_key:
            kwargs.update(access_key=self.access_key, secret_key=self.secret_key, session_token=self.session_token)
        return pafs.S3FileSystem(**kwargs)  # type: ignore[arg-type]


@lru_cache(maxsize=16)
def _s3_filesystem(options: S3Options) -> pafs.S3FileSystem:
    return options.filesystem()


@lru_cache(maxsize=16)
def _fsspec_filesystem(protocol: str) -> pafs.FileSystem:
    try:
        import fsspec
    except ImportError as exc:
        raise SourceError(f"{protocol}:// needs fsspec and its {protocol} driver (pip install fsspec)") from exc
    try:
        handler = pafs.FSSpecHandler(fsspec.filesystem(protocol))
    except (ImportError, ValueError) as exc:
        raise SourceError(f"no fsspec driver for {protocol}://: {exc}") from exc
    return pafs.PyFileSystem(handler)


def split_uri(uri: str) -> tuple[str, str]:
    """Split ``uri`` into its scheme (``""`` for a local path) and the filesystem path."""
    text = os.fspath(uri)
    if text.startswith("file://"):
        return "", text[len("file://") :]
    scheme, sep, rest = text.partition("://")
    if not sep or "/" in scheme or not scheme.isidentifier():
        return "", text
    return scheme.lower(), rest


def filesystem_for(uri: str, *, s3: S3Options | None = None) -> tuple[pafs.FileSystem, str]:
    """The pyarrow filesystem that holds ``uri`` and the path inside it.

    Args:
        uri: Local path, ``file://``, ``s3://bucket/key`` or another fsspec URI.
        s3: S3 options; default read from the environment.

    Returns:
        ``(filesystem, path)``; a local path is made absolute.
    """
    scheme, path = split_uri(uri)
    if scheme == "":
        return pafs.LocalFileSystem(), os.path.abspath(os.path.expanduser(path))
    if scheme in {"s3", "s3a"}:
        return _s3_filesystem(s3 or S3Options.from_env()), path.rstrip("/")
    return _fsspec_filesystem(scheme), path.rstrip("/")


def _to_uri(scheme: str, path: str) -> str:
    return path if scheme == "" else f"{scheme}://{path}"


def open_file(path: str, *, s3: S3Options | None = None) -> bytes:
    """Read a whole file (an image) from any supported filesystem.

    Args:
        path: A ``path`` value of a source table.
        s3: S3 options; default read from the environment.

    Raises:
        OSError: The file cannot be read (missing, permission, network).
    """
    filesystem, inner = filesystem_for(path, s3=s3)
    with filesystem.open_input_stream(inner) as handle:
        return handle.read()


def _describe_access(uri: str, s3: S3Options | None) -> str:
    scheme, _ = split_uri(uri)
    if scheme in {"s3", "s3a"}:
        options = s3 or S3Options.from_env()
        return f" (endpoint {options.endpoint or 'AWS'}, credentials: {options.credential_source})"
    return ""


# --------------------------------------------------------------------------- listing


def _is_image(name: str) -> bool:
    return posixpath.splitext(name)[1].lower() in IMAGE_EXTENSIONS


def _hidden(name: str) -> bool:
    base = posixpath.basename(name)
    return base.startswith(".") or base == "__MACOSX"


def _files_table(scheme: str, infos: Iterable[pafs.FileInfo], label: str | None) -> pa.Table:
    paths, sizes, mtimes = [], [], []
    for info in infos:
        if info.type != pafs.FileType.File or not _is_image(info.base_name) or _hidden(info.base_name):
            continue
        paths.append(_to_uri(scheme, info.path))
        sizes.append(info.size)
        mtimes.append(info.mtime_ns)
    labels = pa.nulls(len(paths), pa.string()) if label is None else pa.array([label] * len(paths), pa.string())
    return pa.Table.from_arrays(
        [pa.array(paths, pa.string()), labels, pa.array(sizes, pa.int64()), pa.array(mtimes, pa.int64())],
        schema=SOURCE_SCHEMA,
    )


def _list_dir(filesystem: pafs.FileSystem, path: str, uri: str, s3: S3Options | None) -> list[pafs.FileInfo]:
    try:
        info = filesystem.get_file_info(path)
        if info.type == pafs.FileType.NotFound:
            raise SourceError(f"{uri}: no such folder or prefix{_describe_access(uri, s3)}")
        if info.type != pafs.FileType.Directory:
            raise SourceError(f"{uri}: not a folder (an image folder or prefix was expected)")
        return filesystem.get_file_info(pafs.FileSelector(path, recursive=False))
    except OSError as exc:
        raise SourceError(f"{uri}: cannot list{_describe_access(uri, s3)}: {exc}") from exc


def _walk(filesystem: pafs.FileSystem, path: str) -> list[pafs.FileInfo]:
    return filesystem.get_file_info(pafs.FileSelector(path, recursive=True))


def list_images(
    uri: str, *, labeled: bool, s3: S3Options | None = None, threads: int = LIST_THREADS
) -> pa.Table:
    """List the image files of a folder or prefix, without reading them.

    Args:
        uri: Local/NFS path, ``s3://bucket/prefix`` or another fsspec URI.
        labeled: ``<uri>/<class>/<file...>`` (label = class folder) if True; else every
            image under ``uri``, recursively, with a null label.
        s3: S3 options; default read from the environment.
        threads: Folders listed in parallel.

    Returns:
        Table with columns ``path``, ``label``, ``size``, ``mtime_ns``, sorted by path.
        Files whose extension is not an image's, and hidden files, are left out.

    Raises:
        SourceError: Missing or unreadable folder (naming the URI and, for S3, the
            endpoint and credential source), no class folders, or an empty class.
    """
    scheme, _ = split_uri(uri)
    filesystem, root = filesystem_for(uri, s3=s3)
    entries = _list_dir(filesystem, root, uri, s3)
    folders = sorted(e.path for e in entries if e.type == pafs.FileType.Directory and not _hidden(e.base_name))
    if labeled:
        if not folders:
            raise SourceError(f"{uri}: no class folders (expected <root>/<class>/<image files>)")
        stray = sum(1 for e in entries if e.type == pafs.FileType.File and _is_image(e.base_name))
        if stray:
            logger.warning("%s: %d images outside class folders are ignored", uri, stray)
    try:
        with ThreadPoolExecutor(max_workers=max(1, min(threads, len(folders) or 1))) as pool:
            listed = list(pool.map(lambda folder: _walk(filesystem, folder), folders))
    except OSError as exc:
        raise SourceError(f"{uri}: cannot list{_describe_access(uri, s3)}: {exc}") from exc
    tables = []
    if not labeled:
        tables.append(_files_table(scheme, entries, None))
    for folder, infos in zip(folders, listed):
        label = posixpath.basename(folder) if labeled else None
        table = _files_table(scheme, infos, label)
        if labeled and table.num_rows == 0:
            raise SourceError(f"class {label!r} has no image files in {_to_uri(scheme, folder)}")
        tables.append(table)
    table = pa.concat_tables(tables) if tables else SOURCE_SCHEMA.empty_table()
    return table.sort_by("path").combine_chunks()


# --------------------------------------------------------------------------- manifests


def _read_manifest_file(uri: str, s3: S3Options | None) -> pa.Table:
    import pyarrow.csv as pacsv
    import pyarrow.parquet as pq

    filesystem, path = filesystem_for(uri, s3=s3)
    suffix = posixpath.splitext(path)[1].lower()
    try:
        if suffix in {".parquet", ".pq"}:
            return pq.read_table(path, filesystem=filesystem)
        if suffix == ".csv":
            with filesystem.open_input_stream(path) as handle:
                return pacsv.read_csv(
                    handle,
                    convert_options=pacsv.ConvertOptions(
                        column_types={"path": pa.string(), "label": pa.string()}, strings_can_be_null=True
                    ),
                )
    except FileNotFoundError as exc:
        raise SourceError(f"manifest {uri} does not exist{_describe_access(uri, s3)}") from exc
    except (OSError, pa.ArrowInvalid) as exc:
        raise SourceError(f"manifest {uri} cannot be read{_describe_access(uri, s3)}: {exc}") from exc
    raise SourceError(f"manifest {uri}: unknown format {suffix!r}; valid: .csv, .parquet")


def _offending(uri: str, what: str, rows: np.ndarray, values: Sequence[object]) -> SourceError:
    # Manifest rows are shown 1-based as data rows (a CSV's header line is not counted).
    shown = ", ".join(f"row {int(r) + 1}: {v!r}" for r, v in zip(rows[:SHOWN_ROWS], values[:SHOWN_ROWS]))
    more = f" (first {SHOWN_ROWS} shown)" if len(rows) > SHOWN_ROWS else ""
    return SourceError(f"manifest {uri}: {len(rows)} rows with {what}{more}: {shown}")


def _resolve_paths(manifest_uri: str, paths: pa.ChunkedArray) -> list[str]:
    scheme, manifest_path = split_uri(manifest_uri)
    if scheme == "":
        base = os.path.dirname(os.path.abspath(os.path.expanduser(manifest_path)))
    else:
        base = posixpath.dirname(manifest_path)
    resolved = []
    for text in paths.to_pylist():
        entry_scheme, _ = split_uri(text)
        if entry_scheme or os.path.isabs(text):
            resolved.append(text)
        elif scheme == "":
            resolved.append(os.path.normpath(os.path.join(base, text)))
        else:
            resolved.append(_to_uri(scheme, posixpath.normpath(posixpath.join(base, text))))
    return resolved


def _stat_all(paths: list[str], s3: S3Options | None, threads: int) -> list[pafs.FileInfo]:
    """File infos of ``paths`` (any mix of filesystems), in order, a chunk per thread."""
    chunk = 256

    def stat(start: int) -> list[pafs.FileInfo]:
        part = paths[start : start + chunk]
        resolved = [filesystem_for(p, s3=s3) for p in part]
        return [filesystem.get_file_info(inner) for filesystem, inner in resolved]

    with ThreadPoolExecutor(max_workers=threads) as pool:
        return [info for infos in pool.map(stat, range(0, len(paths), chunk)) for info in infos]


def read_manifest(
    uri: str,
    *,
    labeled: bool,
    class_names: Sequence[str] | None = None,
    s3: S3Options | None = None,
    threads: int = LIST_THREADS,
) -> pa.Table:
    """Read a CSV or Parquet manifest of image files.

    Every listed file is statted (in parallel, no content read) for its size and
    modification time, so that a missing file fails here and the fingerprint covers it.

    Args:
        uri: Manifest location (local, ``s3://`` or fsspec), ``.csv`` or ``.parquet``.
        labeled: Require a ``label`` column with a label on every row.
        class_names: When given, every label must be one of them.
        s3: S3 options; default read from the environment.
        threads: Parallel stat calls.

    Returns:
        Table with columns ``path``, ``label``, ``size``, ``mtime_ns`` in manifest order;
        relative paths are resolved against the manifest's folder.

    Raises:
        SourceError: Unreadable manifest, a missing column, empty paths or labels,
            labels outside ``class_names`` or missing files; the message gives the
            count and the first offending rows.
    """
    raw = _read_manifest_file(uri, s3)
    required = ["path", "label"] if labeled else ["path"]
    missing = [name for name in required if name not in raw.column_names]
    if missing:
        raise SourceError(f"manifest {uri}: missing column(s) {missing}; it has {raw.column_names}")
    path_column = raw.column("path").cast(pa.string())
    bad = np.flatnonzero(pc.fill_null(pc.equal(pc.utf8_trim_whitespace(path_column), ""), True).to_numpy(False))
    if len(bad):
        raise _offending(uri, "an empty path", bad, [path_column[int(i)].as_py() for i in bad[:SHOWN_ROWS]])
    if labeled:
        labels = raw.column("label").cast(pa.string())
        bad = np.flatnonzero(pc.fill_null(pc.equal(pc.utf8_trim_whitespace(labels), ""), True).to_numpy(False))
        if len(bad):
            raise _offending(uri, "an empty label", bad, [labels[int(i)].as_py() for i in bad[:SHOWN_ROWS]])
        if class_names is not None:
            unknown = pc.invert(pc.is_in(labels, value_set=pa.array(list(class_names), pa.string())))
            bad = np.flatnonzero(unknown.to_numpy(False))
            if len(bad):
                values = [labels[int(i)].as_py() for i in bad[:SHOWN_ROWS]]
                raise _offending(uri, f"a label outside the classes {list(class_names)}", bad, values)
    else:
        labels = pa.nulls(raw.num_rows, pa.string())
    paths = _resolve_paths(uri, path_column)
    del raw
    try:
        infos = _stat_all(paths, s3, threads)
    except OSError as exc:
        raise SourceError(f"manifest {uri}: cannot stat its files{_describe_access(uri, s3)}: {exc}") from exc
    absent = np.flatnonzero([info.type != pafs.FileType.File for info in infos])
    if len(absent):
        raise _offending(uri, "a missing file", absent, [paths[int(i)] for i in absent[:SHOWN_ROWS]])
    return pa.Table.from_arrays(
        [
            pa.array(paths, pa.string()),
            labels.combine_chunks() if isinstance(labels, pa.ChunkedArray) else labels,
            pa.array([info.size for info in infos], pa.int64()),
            pa.array([info.mtime_ns for info in infos], pa.int64()),
        ],
        schema=SOURCE_SCHEMA,
    )


def open_source(
    spec_or_uri: str, *, labeled: bool, class_names: Sequence[str] | None = None, s3: S3Options | None = None
) -> pa.Table:
    """List a source given as ``imagefolder:<uri>``, ``manifest:<uri>`` or a bare URI.

    A bare URI ending in ``.csv``/``.parquet``/``.pq`` is a manifest; anything else an
    image folder.

    Args:
        spec_or_uri: The source spec.
        labeled: Whether labels are required (see :func:`list_images`, :func:`read_manifest`).
        class_names: Allowed labels of a labeled manifest.
        s3: S3 options; default read from the environment.

    Raises:
        SourceError: An empty spec, or whatever the listing raises.
    """
    kind, sep, rest = spec_or_uri.partition(":")
    if sep and kind in {"imagefolder", "manifest"}:
        if not rest:
            raise SourceError(f"{spec_or_uri!r}: {kind} needs a location, e.g. '{kind}:s3://bucket/prefix'")
        if kind == "imagefolder":
            return list_images(rest, labeled=labeled, s3=s3)
        return read_manifest(rest, labeled=labeled, class_names=class_names, s3=s3)
    if not spec_or_uri:
        raise SourceError("empty source; valid: 'imagefolder:<uri>', 'manifest:<uri>', or a folder/.csv/.parquet URI")
    if spec_or_uri.lower().endswith(MANIFEST_SUFFIXES):
        return read_manifest(spec_or_uri, labeled=labeled, class_names=class_names, s3=s3)
    return list_images(spec_or_uri, labeled=labeled, s3=s3)


def class_names_of(table: pa.Table) -> list[str]:
    """The sorted distinct labels of a labeled source table."""
    return sorted(str(v) for v in pc.unique(table.column("label").drop_null()).to_pylist())


# --------------------------------------------------------------------------- fingerprint, split


def fingerprint(table: pa.Table) -> str:
    """SHA-256 over every file's path, size and modification time (no content reads).

    Independent of how the table is chunked; an edited, added, removed or renamed file
    changes it.

    Returns:
        64 hex digits.
    """
    digest = hashlib.sha256(f"polyclip-source-v1:{table.num_rows}".encode())
    step = 1 << 16
    for start in range(0, table.num_rows, step):
        part = table.slice(start, step)
        paths = part.column("path").combine_chunks().cast(pa.large_string())
        offsets = np.frombuffer(paths.buffers()[1], dtype=np.int64)[paths.offset : paths.offset + len(paths) + 1]
        data = paths.buffers()[2]
        first, last = int(offsets[0]), int(offsets[-1])
        digest.update((offsets - first).tobytes())
        if data is not None:  # the slice's bytes only (the buffer may hold the whole column)
            digest.update(memoryview(data)[first:last])
        for name in ("size", "mtime_ns"):
            values = part.column(name).combine_chunks()
            digest.update(pc.fill_null(values, -1).to_numpy(zero_copy_only=False).astype("<i8").tobytes())
    return digest.hexdigest()


def split_table(table: pa.Table, assignments: Mapping[str, np.ndarray]) -> pa.Table:
    """The split as a table: ``subset``, ``row`` (index into ``table``), ``path``, ``label``.

    Raises:
        SourceError: An unknown subset name or a row index outside the table.
    """
    parts = []
    for subset, rows in assignments.items():
        if subset not in SPLIT_SUBSETS:
            raise SourceError(f"unknown split subset {subset!r}; valid: {list(SPLIT_SUBSETS)}")
        index = np.asarray(rows, dtype=np.int64).reshape(-1)
        outside = index[(index < 0) | (index >= table.num_rows)]
        if len(outside):
            raise SourceError(
                f"split subset {subset!r}: {len(outside)} row indices outside 0..{table.num_rows - 1}, "
                f"e.g. {outside[:SHOWN_ROWS].tolist()}"
            )
        picked = table.select(["path", "label"]).take(pa.array(index))
        parts.append(
            pa.table(
                {
                    "subset": pa.array([subset] * len(index), pa.string()),
                    "row": pa.array(index, pa.int64()),
                    "path": picked.column("path"),
                    "label": picked.column("label"),
                }
            )
        )
    if not parts:
        return pa.table({"subset": pa.array([], pa.string()), "row": pa.array([], pa.int64()),
                         "path": pa.array([], pa.string()), "label": pa.array([], pa.string())})
    return pa.concat_tables(parts)


def write_split_manifest(
    path: str | os.PathLike[str],
    table: pa.Table,
    assignments: Mapping[str, np.ndarray],
    *,
    s3: S3Options | None = None,
) -> None:
    """Write a split (which rows of ``table`` went where) as a Parquet manifest, atomically.

    Args:
        path: Destination, local or a URI (S3 makes an object visible only once complete).
        table: The source table the row indices point into.
        assignments: Subset name (``labeled``, ``val``, ``test``, ``unlabeled``) to row indices.
        s3: S3 options; default read from the environment.

    Raises:
        SourceError: An unknown subset or an out-of-range row.
    """
    import pyarrow.parquet as pq

    from polyclip.io import atomic_write_with

    split = split_table(table, assignments)
    scheme, _ = split_uri(os.fspath(path))
    if scheme == "":
        atomic_write_with(Path(split_uri(os.fspath(path))[1]), lambda tmp: pq.write_table(split, tmp))
        return
    filesystem, inner = filesystem_for(os.fspath(path), s3=s3)
    with filesystem.open_output_stream(inner) as out:
        pq.write_table(split, out)


def read_split_manifest(path: str | os.PathLike[str], *, s3: S3Options | None = None) -> dict[str, np.ndarray]:
    """Read back a split written by :func:`write_split_manifest`: subset -> row indices."""
    import pyarrow.parquet as pq

    filesystem, inner = filesystem_for(os.fspath(path), s3=s3)
    split = pq.read_table(inner, filesystem=filesystem, columns=["subset", "row"])
    subsets = split.column("subset").to_numpy(zero_copy_only=False)
    rows = split.column("row").to_numpy()
    return {name: rows[subsets == name] for name in dict.fromkeys(subsets.tolist())}
