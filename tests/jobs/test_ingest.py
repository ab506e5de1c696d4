"""Ray Data ingest: decoding in tasks, dropped files counted, local disk and a real S3 server."""

from pathlib import Path

import numpy as np
import pytest

from jobs.benchmarks.photo_folders import make_photo_folder
from jobs.ingest import IngestStats, dataset_from_arrays, image_dataset
from polyclip.data.images import decode_image
from polyclip.data.sources import (
    S3Options,
    SourceError,
    class_names_of,
    fingerprint,
    list_images,
    open_file,
    read_manifest,
    read_split_manifest,
    write_split_manifest,
)
from tests.s3_fixtures import s3_server, upload_folder  # noqa: F401 - fixture

pytestmark = pytest.mark.ray

GOOD, BAD = 10, 3


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    root = tmp_path_factory.mktemp("ingest") / "labeled"
    summary = make_photo_folder(root, GOOD, num_classes=2, corrupt=BAD, seed=5)
    return root, summary


def _collect(ds) -> dict[str, np.ndarray]:
    parts: dict[str, list[np.ndarray]] = {}
    for batch in ds.iter_batches(batch_size=4, batch_format="numpy"):
        for key, value in batch.items():
            parts.setdefault(key, []).append(value)
    out = {key: np.concatenate(values) for key, values in parts.items()}
    order = np.argsort(out["row"])
    return {key: value[order] for key, value in out.items()}


def _check_decoded(table, got, size, class_names=None, s3=None):
    paths = table.column("path").to_pylist()
    for row, image in zip(got["row"], got["image"]):
        np.testing.assert_array_equal(image, decode_image(open_file(paths[row], s3=s3), size))
    if class_names is not None:
        labels = table.column("label").to_pylist()
        assert [class_names.index(labels[r]) for r in got["row"]] == got["label"].tolist()


def test_image_dataset_decodes_good_files_and_counts_the_bad(ray_cluster, photos):
    root, summary = photos
    table = list_images(str(root), labeled=True)
    assert table.num_rows == GOOD + BAD
    classes = class_names_of(table)
    stats = IngestStats.create()
    got = _collect(image_dataset(table, 24, class_names=classes, stats=stats))
    bad_rows = {i for i, p in enumerate(table.column("path").to_pylist()) if p in summary.corrupt}
    assert set(got["row"].tolist()) == set(range(table.num_rows)) - bad_rows
    assert got["image"].shape == (GOOD, 3, 24, 24) and got["image"].dtype == np.uint8
    assert got["label"].dtype == np.int64
    _check_decoded(table, got, 24, classes)
    report = stats.summary()
    assert report["skipped"] == BAD
    assert report["by_reason"] == {"corrupt": 1, "empty": 1, "not_an_image": 1}
    assert sorted(entry["path"] for entry in report["paths"]) == sorted(summary.corrupt)
    # For the feature store every row stays: a bad file becomes a black image, still counted.
    kept_stats = IngestStats.create()
    kept = _collect(image_dataset(table, 24, stats=kept_stats, keep_failed=True))
    assert kept["row"].tolist() == list(range(table.num_rows))
    assert all(not kept["image"][r].any() for r in bad_rows)
    np.testing.assert_array_equal(kept["image"][sorted(set(range(table.num_rows)) - bad_rows)], got["image"])
    assert kept_stats.summary()["skipped"] == BAD


def test_rows_subset_grayscale_and_strict_mode(ray_cluster, photos):
    root, summary = photos
    table = list_images(str(root), labeled=True)
    paths = table.column("path").to_pylist()
    good = np.array([i for i, p in enumerate(paths) if p not in summary.corrupt][:4])
    got = _collect(image_dataset(table, 16, rows=good, channels=1, strict=True))
    assert got["row"].tolist() == sorted(good.tolist()) and got["image"].shape == (4, 1, 16, 16)
    assert "label" not in got
    bad = np.array([paths.index(summary.corrupt[0])])
    with pytest.raises(Exception, match="bad_truncated"):
        _collect(image_dataset(table, 16, rows=bad, strict=True))
    with pytest.raises(SourceError, match="1 rows have a label outside the classes"):
        image_dataset(table, 16, rows=good[:1], class_names=["nothing"])
    with pytest.raises(SourceError, match="rows outside"):
        image_dataset(table, 16, rows=np.array([table.num_rows]))


def test_dataset_from_arrays_keeps_rows_in_blocks(ray_cluster, fashion_mnist):
    x, y = fashion_mnist.train.images[:3000], fashion_mnist.train.labels[:3000]
    rows = np.arange(500, 2500)
    ds = dataset_from_arrays(x, y, rows=rows, block_rows=512)
    assert ds.num_blocks() == 4
    got = _collect(ds)
    assert sorted(ds.schema().names) == ["image", "label", "row"]
    np.testing.assert_array_equal(got["row"], rows)
    np.testing.assert_array_equal(got["image"], x[rows])
    np.testing.assert_array_equal(got["label"], y[rows])


def test_s3_listing_bytes_and_ingest_through_a_real_server(ray_cluster, s3_server, photos, monkeypatch):  # noqa: F811
    root, _ = photos
    upload_folder(s3_server, root, "photos/labeled")
    s3 = S3Options.from_env(s3_server.env())
    local = list_images(str(root), labeled=True)
    remote = list_images("s3://photos/labeled", labeled=True, s3=s3)
    assert [p.removeprefix("s3://photos/labeled/") for p in remote.column("path").to_pylist()] == [
        str(Path(p).relative_to(root)) for p in local.column("path").to_pylist()
    ]
    assert remote.column("size").equals(local.column("size"))
    assert remote.column("label").equals(local.column("label"))
    # Bytes read back equal the bytes written (SeaweedFS's checksum-framing trap).
    assert open_file(remote.column("path")[0].as_py(), s3=s3) == Path(local.column("path")[0].as_py()).read_bytes()

    stats = IngestStats.create()
    classes = class_names_of(remote)
    got = _collect(image_dataset(remote, 24, class_names=classes, stats=stats, s3=s3))
    assert len(got["row"]) == GOOD
    _check_decoded(local, got, 24, classes)  # same rows, same pixels as from local disk
    assert stats.summary()["skipped"] == BAD

    # Split manifests go to the bucket too, readable back.
    write_split_manifest("s3://photos/run/split.parquet", remote, {"labeled": np.array([1, 2])}, s3=s3)
    np.testing.assert_array_equal(read_split_manifest("s3://photos/run/split.parquet", s3=s3)["labeled"], [1, 2])

    # A manifest in the bucket with paths relative to its folder, statted on S3.
    fs = s3_server.filesystem()
    relative = [p.removeprefix("s3://photos/") for p in remote.column("path").to_pylist()[:3]]
    with fs.open_output_stream("photos/manifest.csv") as out:
        out.write(("path,label\n" + "".join(f"{p},cat\n" for p in relative)).encode())
    manifest = read_manifest("s3://photos/manifest.csv", labeled=True, s3=s3)
    assert manifest.column("path").to_pylist() == remote.column("path").to_pylist()[:3]
    assert manifest.column("size").equals(remote.column("size").slice(0, 3))

    # Rewriting an object changes the fingerprint (size and modification time from S3).
    before = fingerprint(remote)
    first = remote.column("path")[0].as_py().removeprefix("s3://")
    with fs.open_output_stream(first) as out:
        out.write(Path(local.column("path")[0].as_py()).read_bytes() + b"\0")
    assert fingerprint(list_images("s3://photos/labeled", labeled=True, s3=s3)) != before

    # The environment is what users set: endpoint and keys from AWS_* variables.
    for key, value in s3_server.env().items():
        monkeypatch.setenv(key, value)
    assert list_images("s3://photos/labeled", labeled=True).column("path").equals(remote.column("path"))


def test_s3_bad_credentials_and_missing_prefix_fail_before_work(s3_server):  # noqa: F811
    wrong = S3Options.from_env(s3_server.env() | {"AWS_SECRET_ACCESS_KEY": "wrong-secret"})
    with pytest.raises(SourceError, match=r"s3://photos/labeled: .*AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY"):
        list_images("s3://photos/labeled", labeled=True, s3=wrong)
    s3 = S3Options.from_env(s3_server.env())
    with pytest.raises(SourceError, match=r"s3://photos/absent: no such folder or prefix \(endpoint http://127"):
        list_images("s3://photos/absent", labeled=False, s3=s3)


@pytest.fixture()
def two_node_cluster(_ray_session):
    """A head that runs no tasks (0 CPUs) and one 2-CPU worker node; ours alone, shut down after."""
    import ray
    from ray.cluster_utils import Cluster

    from jobs.runtime import project_runtime_env

    ray.shutdown()  # the session's shared local cluster, if a previous test started one
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 0, "include_dashboard": False})
    cluster.add_node(num_cpus=2, resources={"decoder_node": 2})
    ray.init(address=cluster.address, runtime_env=project_runtime_env(), logging_level="WARNING")
    cluster.wait_for_nodes()
    yield cluster
    ray.shutdown()
    cluster.shutdown()


@pytest.mark.slow
def test_two_node_cluster_decodes_from_s3_on_the_worker_node(two_node_cluster, s3_server, photos):  # noqa: F811
    root, _ = photos
    upload_folder(s3_server, root, "multinode/pool")
    s3 = S3Options.from_env(s3_server.env())
    table = list_images("s3://multinode/pool", labeled=False, s3=s3)
    assert table.num_rows == GOOD + BAD and table.column("label").null_count == table.num_rows
    stats = IngestStats.create()
    got = _collect(image_dataset(table, 24, stats=stats, s3=s3))  # the head has no CPU: tasks ran elsewhere
    assert len(got["row"]) == GOOD and stats.summary()["skipped"] == BAD
    _check_decoded(table, got, 24, s3=s3)
