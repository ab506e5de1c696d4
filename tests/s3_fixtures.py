"""Pytest fixtures for a real S3-compatible server (SeaweedFS) on loopback.

Import the fixtures into a test module (``from tests.s3_fixtures import s3_server``);
each importing module gets one server, started on free ports and stopped by PID.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.s3_server import S3Server


@pytest.fixture(scope="module")
def s3_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[S3Server]:
    """A running SeaweedFS S3 gateway with one identity (see :meth:`S3Server.env`)."""
    server = S3Server.start(tmp_path_factory.mktemp("seaweedfs"))
    try:
        yield server
    finally:
        server.stop(grace_s=2.0)


def upload_folder(server: S3Server, local: str | os.PathLike[str], prefix: str) -> int:
    """Copy every file under ``local`` to ``<prefix>/<relative path>`` (``prefix`` = bucket/key...).

    Returns:
        Number of files uploaded.
    """
    fs = server.filesystem()
    bucket = prefix.split("/", 1)[0]
    fs.create_dir(bucket)
    count = 0
    for path in sorted(Path(local).rglob("*")):
        if path.is_file():
            with fs.open_output_stream(f"{prefix}/{path.relative_to(local).as_posix()}") as out:
                out.write(path.read_bytes())
            count += 1
    return count
