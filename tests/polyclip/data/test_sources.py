"""Image sources: folder listings, manifests, fingerprints and split manifests (local disk)."""

import os
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from jobs.benchmarks.photo_folders import encode_jpeg, make_photo_folder
from polyclip.data.sources import (
    S3Options,
    SourceError,
    class_names_of,
    fingerprint,
    list_images,
    open_file,
    open_source,
    read_manifest,
    read_split_manifest,
    split_uri,
    write_split_manifest,
)


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    root = tmp_path_factory.mktemp("photos")
    make_photo_folder(root / "labeled", 12, num_classes=3, corrupt=0, seed=1)
    make_photo_folder(root / "pool", 7, labeled=False, seed=2)
    (root / "pool" / "nested").mkdir()
    (root / "pool" / "nested" / "deep.JPG").write_bytes((root / "pool" / "astronaut_0000000.jpg").read_bytes())
    (root / "pool" / "notes.txt").write_text("not an image")
    (root / "pool" / ".hidden.jpg").write_bytes(b"x")
    return root


def test_labeled_listing_has_paths_labels_sizes_and_is_sorted(photos):
    table = list_images(str(photos / "labeled"), labeled=True)
    assert table.column_names == ["path", "label", "size", "mtime_ns"]
    assert table.num_rows == 12
    paths = table.column("path").to_pylist()
    assert paths == sorted(paths) and all(os.path.isabs(p) for p in paths)
    assert class_names_of(table) == ["astronaut", "cat", "coffee"]
    assert all(p.split(os.sep)[-2] == label for p, label in zip(paths, table.column("label").to_pylist()))
    assert table.column("size").to_pylist() == [os.path.getsize(p) for p in paths]
    assert table.column("mtime_ns").to_pylist() == [os.stat(p).st_mtime_ns for p in paths]
    assert open_file(paths[0]) == Path(paths[0]).read_bytes()


def test_unlabeled_listing_is_recursive_images_only_with_null_labels(photos):
    table = list_images(str(photos / "pool"), labeled=False)
    names = [os.path.relpath(p, photos / "pool") for p in table.column("path").to_pylist()]
    assert len(names) == 8 and "nested/deep.JPG" in names
    assert "notes.txt" not in names and ".hidden.jpg" not in names and "photos.json" not in names
    assert table.column("label").null_count == 8


def test_missing_folder_and_folder_without_classes_fail_clearly(photos, tmp_path):
    with pytest.raises(SourceError, match="no such folder"):
        list_images(str(tmp_path / "absent"), labeled=True)
    with pytest.raises(SourceError, match="no class folders"):
        list_images(str(photos / "pool" / "nested"), labeled=True)
    (tmp_path / "empty_class").mkdir()
    (tmp_path / "good").mkdir()
    (tmp_path / "good" / "a.jpg").write_bytes(encode_jpeg(_red()))
    with pytest.raises(SourceError, match="'empty_class' has no image files"):
        list_images(str(tmp_path), labeled=True)


def _red():
    from PIL import Image

    return Image.new("RGB", (40, 30), (200, 10, 10))


def test_csv_manifest_resolves_relative_paths_against_its_folder(photos, tmp_path):
    listing = list_images(str(photos / "labeled"), labeled=True)
    rows = listing.to_pylist()[:4]
    manifest = photos / "labeled" / "manifest.csv"
    lines = ["path,label"] + [f"{os.path.relpath(r['path'], manifest.parent)},{r['label']}" for r in rows]
    manifest.write_text("\n".join(lines) + "\n")
    table = read_manifest(str(manifest), labeled=True)
    assert table.column("path").to_pylist() == [r["path"] for r in rows]
    assert table.column("size").to_pylist() == [r["size"] for r in rows]
    assert table.column("label").to_pylist() == [r["label"] for r in rows]
    via_spec = open_source(f"manifest:{manifest}", labeled=True)
    assert via_spec.equals(table)
    assert open_source(str(manifest), labeled=True).equals(table)  # bare .csv URI
    manifest.unlink()


def test_parquet_manifest_unlabeled_with_absolute_paths(photos, tmp_path):
    listing = list_images(str(photos / "pool"), labeled=False)
    pq.write_table(pa.table({"path": listing.column("path"), "extra": pa.array(range(listing.num_rows))}),
                   tmp_path / "pool.parquet")
    table = read_manifest(str(tmp_path / "pool.parquet"), labeled=False)
    assert table.equals(listing)


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("file,label\na.jpg,cat\n", r"missing column\(s\) \['path'\]"),
        ("path\na.jpg\n", r"missing column\(s\) \['label'\]"),
        ("path,label\nastronaut/astronaut_0000000.jpg,\n", "1 rows with an empty label.*row 1"),
        ("path,label\nastronaut/astronaut_0000000.jpg,astronaut\nnope.jpg,cat\n", "1 rows with a missing file.*row 2"),
        ("path,label\nastronaut/astronaut_0000000.jpg,dog\n", "1 rows with a label outside the classes"),
    ],
)
def test_bad_manifests_name_the_file_and_rows(photos, content, message):
    manifest = photos / "labeled" / "bad.csv"
    manifest.write_text(content)
    try:
        with pytest.raises(SourceError, match=message) as info:
            read_manifest(str(manifest), labeled=True, class_names=["astronaut", "cat", "coffee"])
        assert str(manifest) in str(info.value)
    finally:
        manifest.unlink()


def test_many_bad_rows_show_the_count_and_the_first_ten(photos):
    manifest = photos / "labeled" / "many.csv"
    manifest.write_text("path,label\n" + "".join(f"missing{i}.jpg,cat\n" for i in range(25)))
    try:
        with pytest.raises(SourceError, match=r"25 rows with a missing file \(first 10 shown\)") as info:
            read_manifest(str(manifest), labeled=True)
        assert "missing9.jpg" in str(info.value) and "missing10.jpg" not in str(info.value)
    finally:
        manifest.unlink()


def test_fingerprint_changes_when_a_file_changes_and_ignores_chunking(tmp_path):
    make_photo_folder(tmp_path, 6, num_classes=2, seed=3)
    first = list_images(str(tmp_path), labeled=True)
    digest = fingerprint(first)
    assert len(digest) == 64
    rechunked = pa.concat_tables([first.slice(0, 2), first.slice(2)])
    assert fingerprint(rechunked) == digest
    assert fingerprint(list_images(str(tmp_path), labeled=True)) == digest
    edited = first.column("path")[3].as_py()
    with open(edited, "ab") as handle:
        handle.write(b"\0")  # one byte more: size (and mtime) change
    assert fingerprint(list_images(str(tmp_path), labeled=True)) != digest
    stat = os.stat(edited)
    os.utime(edited, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1))  # touched, same size
    assert fingerprint(list_images(str(tmp_path), labeled=True)) not in {digest}


def test_split_manifest_round_trips_and_rejects_bad_subsets(photos, tmp_path):
    table = list_images(str(photos / "labeled"), labeled=True)
    assignments = {"labeled": np.array([0, 5]), "val": np.array([1]), "unlabeled": np.array([2, 3, 4])}
    target = tmp_path / "run" / "split.parquet"
    write_split_manifest(target, table, assignments)
    written = pq.read_table(target)
    assert written.column_names == ["subset", "row", "path", "label"]
    assert written.column("path").to_pylist()[:2] == [table.column("path")[0].as_py(), table.column("path")[5].as_py()]
    back = read_split_manifest(target)
    assert set(back) == set(assignments)
    for name, rows in assignments.items():
        np.testing.assert_array_equal(back[name], rows)
    assert [p.name for p in target.parent.iterdir()] == ["split.parquet"]  # no temporary left
    with pytest.raises(SourceError, match="unknown split subset 'train'"):
        write_split_manifest(target, table, {"train": np.array([0])})
    with pytest.raises(SourceError, match=r"outside 0\.\.11"):
        write_split_manifest(target, table, {"val": np.array([12])})


def test_uri_parsing_and_s3_options_from_env():
    assert split_uri("/data/x") == ("", "/data/x")
    assert split_uri("file:///data/x") == ("", "/data/x")
    assert split_uri("s3://bucket/a/b") == ("s3", "bucket/a/b")
    assert split_uri("relative/dir") == ("", "relative/dir")
    options = S3Options.from_env({"AWS_ENDPOINT_URL": "http://127.0.0.1:9000", "AWS_ACCESS_KEY_ID": "k",
                                  "AWS_SECRET_ACCESS_KEY": "secret"})
    assert options.endpoint == "http://127.0.0.1:9000" and "secret" not in repr(options)
    assert "AWS_ACCESS_KEY_ID" in options.credential_source
    assert "default credential chain" in S3Options.from_env({}).credential_source
    with pytest.raises(SourceError, match="imagefolder needs a location"):
        open_source("imagefolder:", labeled=True)
