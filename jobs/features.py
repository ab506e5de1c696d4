"""Feature encoding through Ray Data into the sharded feature store; encode once, reuse everywhere.

A frozen backbone runs as a ``map_batches`` actor pool: one actor per GPU under bf16/fp16
autocast where the cluster has GPUs, CPU actors with a fractional CPU share otherwise (so
the read and decode tasks of the same dataset still get a CPU). The driver receives the
features as they come and writes them to the store shard by shard, indexed by each row's
``row`` number, so it never holds more than the shards in flight, and a killed encode
resumes with the shards it had finished.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import numpy as np

from polyclip.backbones import cache_identity, create_backbone
from polyclip.features.cache import FeatureCache, describe, feature_key
from polyclip.features.store import FeatureSet, FeatureStore, ShardError, ShardWriter
from polyclip.progress import Progress, format_seconds

if TYPE_CHECKING:
    import ray.data
    import torch

logger = logging.getLogger("polyclip")

PRECISIONS = ("auto", "fp32", "bf16", "fp16")


def inference_dtype(device: torch.device, precision: str = "auto") -> torch.dtype | None:
    """The autocast dtype for inference on ``device``; ``None`` means plain fp32.

    ``auto`` gives bf16 on GPUs that support it, fp16 on other GPUs, fp32 on CPU.

    Raises:
        ValueError: An unknown ``precision``.
    """
    import torch

    if precision not in PRECISIONS:
        raise ValueError(f"precision {precision!r} is not one of {PRECISIONS}")
    if precision == "fp32" or (precision == "auto" and device.type != "cuda"):
        return None
    if precision == "auto":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.bfloat16 if precision == "bf16" else torch.float16


class BatchEncoder:
    """A ``map_batches`` UDF holding one frozen backbone: ``{"row", "image"} -> {"row", "features"}``.

    Ray-free: Ray Data builds one per actor, and a test or device check can call it directly.

    Args:
        spec: Backbone spec.
        image_size: Input size override.
        device: ``"cpu"`` or ``"cuda"`` (the actor's reserved GPU).
        precision: ``auto``, ``fp32``, ``bf16`` or ``fp16`` (autocast dtype).
        threads: Torch intra-op threads (CPU actors share the node with others).
        keep_shards: Encode only rows of these shards (a resumed encode); others are dropped.
        shard_rows: Rows per shard, with ``keep_shards``.
    """

    def __init__(self, spec: str, image_size: int | None, *, device: str = "cpu", precision: str = "auto",
                 threads: int | None = None, keep_shards: list[int] | None = None,
                 shard_rows: int | None = None) -> None:
        import torch

        if threads:
            torch.set_num_threads(threads)
        # Every actor must build the same weights: a `random:` spec would otherwise give
        # each block of one feature set its own random network.
        torch.manual_seed(0)
        self.device = torch.device(device)
        self.backbone = create_backbone(spec, image_size=image_size).eval().to(self.device)
        self.autocast = inference_dtype(self.device, precision)
        self.keep = None if keep_shards is None else np.asarray(sorted(keep_shards), dtype=np.int64)
        self.shard_rows = shard_rows

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        import torch

        rows = np.asarray(batch["row"]).astype(np.int64, copy=False)
        images = batch["image"]
        if self.keep is not None and self.shard_rows:
            wanted = np.isin(rows // self.shard_rows, self.keep)
            rows, images = rows[wanted], images[wanted]
        if len(rows) == 0:
            return {"row": rows, "features": np.empty((0, self.backbone.num_features), dtype=np.float32)}
        pixels = torch.from_numpy(_stack_images(images, rows))
        if self.device.type == "cuda":
            pixels = pixels.pin_memory().to(self.device, non_blocking=True)
        with torch.inference_mode(), torch.autocast(self.device.type, dtype=self.autocast or torch.float32,
                                                    enabled=self.autocast is not None):
            features = self.backbone.encode(pixels)
        return {"row": rows, "features": features.float().cpu().numpy()}


def _stack_images(images: Any, rows: np.ndarray) -> np.ndarray:
    """A writable ``uint8 (B, C, H, W)`` array from a batch column (ragged batches refused)."""
    if isinstance(images, np.ndarray) and images.dtype != object:
        array = np.array(images, dtype=np.uint8)  # a writable copy of Ray's read-only view
    else:
        shapes = {np.shape(image) for image in images}
        if len(shapes) > 1:
            raise ValueError(f"images of rows {rows[:5].tolist()}... have different shapes {sorted(shapes)[:3]}; "
                             "decode them to one size before encoding")
        array = np.stack([np.asarray(image, dtype=np.uint8) for image in images])
    if array.ndim != 4:
        raise ValueError(f"images must be uint8 (B, C, H, W), got shape {array.shape} (rows {rows[:5].tolist()}...)")
    return array


class _ShardAssembler:
    """Collects encoded rows into per-shard buffers; writes each shard once it is full."""

    def __init__(self, writer: ShardWriter, todo: list[int]) -> None:
        self.writer, self.todo = writer, set(todo)
        self.open: dict[int, tuple[np.ndarray, np.ndarray]] = {}  # shard -> (features, filled)
        self.written = 0
        self.max_open = 0

    def add(self, rows: np.ndarray, features: np.ndarray) -> int:
        """Place a batch; returns how many new rows it brought."""
        rows = np.asarray(rows, dtype=np.int64)
        if len(rows) != len(features):
            raise ValueError(f"encoder returned {len(features)} features for {len(rows)} rows")
        if len(rows) and (rows.min() < 0 or rows.max() >= self.writer.num_rows):
            bad = rows[(rows < 0) | (rows >= self.writer.num_rows)][0]
            raise ValueError(f"row {int(bad)} is outside [0, {self.writer.num_rows}): the dataset's `row` column "
                             "must number its rows 0..N-1")
        added = 0
        shard_of = rows // self.writer.shard_rows
        for number in np.unique(shard_of):
            number = int(number)
            if number not in self.todo:
                continue  # already stored (a resumed encode), or a duplicate of a written shard
            start, stop = self.writer.bounds(number)
            if number not in self.open:
                self.open[number] = (np.empty((stop - start, features.shape[1]), dtype=np.float32),
                                     np.zeros(stop - start, dtype=bool))
                self.max_open = max(self.max_open, len(self.open))
            buffer, filled = self.open[number]
            take = shard_of == number
            local = rows[take] - start
            added += int((~filled[local]).sum())
            buffer[local] = features[take]
            filled[local] = True
            if filled.all():
                self.writer.write_shard(number, buffer)
                del self.open[number]
                self.todo.discard(number)
                self.written += 1
        return added

    def check_complete(self) -> None:
        if self.todo:
            number = min(self.todo)
            start, stop = self.writer.bounds(number)
            got = int(self.open[number][1].sum()) if number in self.open else 0
            raise ValueError(f"the dataset ended with {len(self.todo)} shards incomplete: shard {number} "
                             f"(rows {start}..{stop}) got {got} of {stop - start} rows; every row 0..N-1 "
                             "must appear once")


def cpu_share(concurrency: int, cluster_cpus: float) -> float:
    """CPUs to reserve per CPU encoder actor, leaving at least one CPU for read/decode tasks.

    With ``num_cpus=1`` per actor, two actors on a 2-CPU cluster take every CPU and the
    read tasks of the same dataset never run: the dataset hangs without an error.
    """
    spare = max(cluster_cpus - 1.0, 0.25)
    return round(max(0.1, min(1.0, spare / max(concurrency, 1))), 2)


def encode_dataset(
    ds: ray.data.Dataset | Callable[[np.ndarray | None], ray.data.Dataset],
    spec: str,
    image_size: int | None,
    store: FeatureStore,
    key: str,
    *,
    use_gpu: bool,
    batch_size: int = 128,
    concurrency: int = 2,
    num_rows: int | None = None,
    description: dict[str, Any] | None = None,
    shard_rows: int | None = None,
    cpus_per_actor: float | None = None,
    precision: str = "auto",
    stats: dict[str, Any] | None = None,
) -> FeatureSet:
    """Encode a Ray Dataset of ``{"row": int64, "image": uint8 (C, H, W)}`` into the store.

    Only the shards the entry is missing are encoded (rows of finished shards are dropped
    before the backbone sees them); each shard is written as soon as its rows are in, and
    the index last.

    Args:
        ds: The images; ``row`` numbers them ``0..N-1`` (row ``i`` becomes feature ``i``).
            Or a function ``rows -> Dataset`` of those rows only (``None``: all of them):
            a resumed encoding then neither reads nor decodes the images of finished
            shards (needs ``num_rows``).
        spec: Backbone spec.
        image_size: Input size override.
        store: Where the features go.
        key: The entry (see :func:`polyclip.features.feature_key`).
        use_gpu: One actor per GPU (``num_gpus=1``) with autocast; else CPU actors.
        batch_size: Images per forward pass.
        concurrency: Encoder actors.
        num_rows: Rows of ``ds`` when known (otherwise ``ds.count()`` runs the dataset's
            reads once more).
        description: Stored in the index.
        shard_rows: Rows per shard (default: the store's).
        cpus_per_actor: CPUs reserved per actor (default: 1 with a GPU, else a share that
            leaves a CPU for reads; see :func:`cpu_share`).
        precision: Autocast dtype on GPUs: ``auto`` (bf16, else fp16), ``bf16``, ``fp16``, ``fp32``.
        stats: If given, filled with ``encoded_rows``, ``shards_written``, ``shards_reused``,
            ``max_open_shards`` and ``seconds``.

    Returns:
        The complete entry.

    Raises:
        ValueError: Rows outside ``0..N-1``, rows missing, or ragged images.
    """
    import ray

    if batch_size < 1 or concurrency < 1:
        raise ValueError(f"batch_size ({batch_size}) and concurrency ({concurrency}) must be at least 1")
    lazy = callable(ds) and not isinstance(ds, ray.data.Dataset)
    if lazy and num_rows is None:
        raise ValueError("encode_dataset: a dataset function needs num_rows")
    n = int(ds.count()) if num_rows is None else int(num_rows)  # type: ignore[union-attr]
    writer = store.writer(key, description or {"backbone": spec, "image_size": image_size or 0}, n, shard_rows)
    todo = writer.missing_shards()
    reused = writer.num_shards - len(todo)
    start_time = time.perf_counter()
    assembler = _ShardAssembler(writer, todo)
    encoded_rows = 0
    if todo:
        total = sum(stop - start for start, stop in map(writer.bounds, todo))
        if use_gpu:
            resources: dict[str, Any] = {"num_gpus": 1, "num_cpus": cpus_per_actor or 1}
            threads = None
        else:
            share = cpus_per_actor or cpu_share(concurrency, ray.cluster_resources().get("CPU", 1.0))
            resources = {"num_cpus": share}
            threads = max(1, int(share))
        if lazy:  # decode only the rows of the missing shards
            rows = np.concatenate([np.arange(*writer.bounds(s)) for s in todo]) if reused else None
            ds = ds(rows)  # type: ignore[operator]
        encoder_kwargs = {
            "device": "cuda" if use_gpu else "cpu", "precision": precision, "threads": threads,
            "keep_shards": todo if reused else None, "shard_rows": writer.shard_rows,
        }
        encoded = ds.map_batches(  # type: ignore[union-attr]
            BatchEncoder, fn_constructor_args=(spec, image_size), fn_constructor_kwargs=encoder_kwargs,
            batch_size=batch_size, batch_format="numpy",
            compute=ray.data.ActorPoolStrategy(size=concurrency), **resources,
        )
        logger.info("encode %s into %s: %d rows in %d shards (%d reused), %d %s actors, %s", spec,
                    store.uri(key), total, len(todo), reused, concurrency, "GPU" if use_gpu else "CPU", resources)
        progress = Progress(f"encode {spec}", total, unit="img", interval=10.0)
        for batch in encoded.iter_batches(batch_size=None, batch_format="numpy"):
            added = assembler.add(batch["row"], batch["features"])
            encoded_rows += added
            progress.update(added)
        progress.close()
        assembler.check_complete()
    entry = writer.finish()
    if stats is not None:
        stats.update({"encoded_rows": encoded_rows, "shards_written": assembler.written, "shards_reused": reused,
                      "max_open_shards": assembler.max_open, "seconds": round(time.perf_counter() - start_time, 3)})
    return entry


def images_dataset(images: np.ndarray, block_rows: int = 250) -> ray.data.Dataset:
    """In-memory ``uint8 (N, C, H, W)`` images as a Ray Dataset of ``{"row", "image"}`` blocks."""
    import ray.data
    from ray.data.block import BlockAccessor

    if images.ndim != 4:
        raise ValueError(f"images must be uint8 (N, C, H, W), got shape {images.shape}")
    blocks = [
        BlockAccessor.batch_to_block({"row": np.arange(s, min(s + block_rows, len(images)), dtype=np.int64),
                                      "image": np.ascontiguousarray(images[s : s + block_rows])})
        for s in range(0, len(images), block_rows)
    ]
    return ray.data.from_arrow(blocks)


def cached_features(
    cache: FeatureCache | FeatureStore,
    spec: str,
    image_size: int | None,
    dataset_fingerprint: str,
    dataset_spec: str,
    pool: str,
    indices: np.ndarray,
    images: np.ndarray,
    *,
    num_workers: int = 2,
    chunk: int = 250,
    stats: dict[str, Any] | None = None,
    use_gpu: bool | None = None,
) -> np.ndarray:
    """Features of in-memory ``images`` from the store, or encoded through Ray Data on a miss.

    Args:
        cache: The feature cache (or store) to read and fill.
        spec: Backbone spec.
        image_size: Input size override (part of the key).
        dataset_fingerprint: ``Dataset.fingerprint``.
        dataset_spec: For the entry's description.
        pool: ``"train"`` or ``"test"``.
        indices: Indices of ``images`` in the pool (part of the key).
        images: The uint8 images to encode on a miss, one per index.
        num_workers: Encoder actors.
        chunk: Images per Ray Data block (progress granularity).
        stats: If given, ``{"hit": bool, "seconds": float, "images_per_s": float}`` is
            appended under the spec for the run report.
        use_gpu: Encode on GPU actors; ``None`` uses GPUs when the cluster has them.

    Raises:
        ValueError: ``images`` and ``indices`` of different lengths.
    """
    if len(images) != len(indices):
        raise ValueError(f"{len(images)} images for {len(indices)} indices of {dataset_spec} ({pool})")
    store = cache.store if isinstance(cache, FeatureCache) else cache
    probe = create_backbone(spec, image_size=image_size)
    key = feature_key(cache_identity(spec), probe.preprocessing.key(), dataset_fingerprint, pool, indices)
    start = time.perf_counter()
    hit = _read_entry(cache, store, key)
    if hit is not None and len(hit) == len(indices):
        logger.info("features %s (%s, %d images): cache hit %s", spec, pool, len(indices), store.uri(key))
        _record(stats, spec, True, time.perf_counter() - start, len(indices))
        return hit
    if len(indices) == 0:
        return np.empty((0, probe.num_features), dtype=np.float32)
    del probe
    import ray

    gpu = ray.cluster_resources().get("GPU", 0) >= 1 if use_gpu is None else use_gpu
    entry = encode_dataset(
        images_dataset(images, chunk), spec, image_size, store, key, use_gpu=gpu, batch_size=min(100, chunk),
        concurrency=max(1, min(num_workers, -(-len(images) // chunk))), num_rows=len(images),
        description=describe(spec, image_size or 0, dataset_spec, pool, len(indices)),
    )
    features = entry.to_numpy()
    elapsed = time.perf_counter() - start
    logger.info("cached %s in %s", store.uri(key), format_seconds(elapsed))
    _record(stats, spec, False, elapsed, len(indices))
    return features


def _read_entry(cache: FeatureCache | FeatureStore, store: FeatureStore, key: str) -> np.ndarray | None:
    entry = store.open(key)
    if entry is not None:
        try:
            return entry.to_numpy()
        except ShardError as exc:  # repaired below: the writer re-encodes the damaged shard
            logger.warning("feature store entry %s is damaged (%s); re-encoding", store.uri(key), exc)
            return None
    if isinstance(cache, FeatureCache):
        legacy = cache.legacy_get(key)
        if legacy is not None:  # an older polyclip's single-file entry: move it into the store
            store.write_array(key, legacy.astype(np.float32, copy=False), {"migrated_from": f"{key}.npy"})
            return legacy
    return None


def _record(stats: dict[str, Any] | None, spec: str, hit: bool, seconds: float, n: int) -> None:
    if stats is not None:
        stats.setdefault(spec, []).append(
            {"hit": hit, "seconds": round(seconds, 3), "n": n, "images_per_s": round(n / max(seconds, 1e-9), 1)}
        )
