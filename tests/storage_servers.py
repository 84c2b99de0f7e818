"""Real storage servers for the remote-shard tests and benchmark, each its own process on
127.0.0.1, started and stopped by them: Python's HTTP file server, and moto's standalone
S3-compatible server (the same wire protocol, signing and errors as S3, from the package
registry)."""

from __future__ import annotations

import importlib
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

S3_CREDENTIALS = {"AWS_ACCESS_KEY_ID": "app-dist-test", "AWS_SECRET_ACCESS_KEY": "not-a-secret",
                  "AWS_DEFAULT_REGION": "us-east-1"}


def require(module: str) -> None:
    """Skip when an optional test dependency is missing, except in CI, which installs all."""
    try:
        importlib.import_module(module)
    except ImportError:
        if os.environ.get("CI") == "true":
            pytest.fail(f"{module} is not installed; CI installs requirements.lock")
        pytest.skip(f"{module} is not installed (pip install -r requirements.lock)")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class ServerProcess:
    """A server process on a fixed port of 127.0.0.1 that can be stopped (SIGKILL: as a lost
    machine) and started again on the same port."""

    def __init__(self) -> None:
        self.port = free_port()
        self.process: subprocess.Popen | None = None

    def command(self) -> list[str]:
        raise NotImplementedError

    def start(self, timeout: float = 60) -> None:
        self.process = subprocess.Popen(self.command(), stdout=subprocess.DEVNULL,
                                        stderr=subprocess.DEVNULL, start_new_session=True)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"{self.command()} exited with {self.process.returncode}")
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=1):
                    return
            except OSError:
                time.sleep(0.1)
        raise RuntimeError(f"{self.command()} did not listen on port {self.port}")

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait(timeout=30)
        self.process = None


class HttpShardServer(ServerProcess):
    """`python -m http.server` serving `folder`: its files at http://127.0.0.1:PORT/NAME."""

    def __init__(self, folder: Path) -> None:
        super().__init__()
        self.folder = folder

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def command(self) -> list[str]:
        return [sys.executable, "-m", "http.server", "--bind", "127.0.0.1", str(self.port),
                "--directory", str(self.folder)]


class S3Server(ServerProcess):
    """moto's S3 server; clients find it through AWS_ENDPOINT_URL (in `env`), as they would
    any S3-compatible store."""

    @property
    def env(self) -> dict[str, str]:
        return {**S3_CREDENTIALS, "AWS_ENDPOINT_URL": f"http://127.0.0.1:{self.port}"}

    def command(self) -> list[str]:
        return [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(self.port)]

    def filesystem(self):
        """An s3fs client of this server, with the test credentials (this process's
        environment is left alone)."""
        import s3fs

        return s3fs.S3FileSystem(key=S3_CREDENTIALS["AWS_ACCESS_KEY_ID"],
                                 secret=S3_CREDENTIALS["AWS_SECRET_ACCESS_KEY"],
                                 endpoint_url=self.env["AWS_ENDPOINT_URL"],
                                 skip_instance_cache=True)

    def make_bucket(self, bucket: str) -> None:
        fs = self.filesystem()
        if not fs.exists(bucket):
            fs.mkdir(bucket)

    def upload(self, folder: Path, bucket: str, prefix: str) -> str:
        """Copy `folder`'s files to s3://bucket/prefix/ (creating the bucket); that URL."""
        self.make_bucket(bucket)
        fs = self.filesystem()
        for path in sorted(folder.iterdir()):
            fs.put_file(str(path), f"{bucket}/{prefix}/{path.name}")
        return f"s3://{bucket}/{prefix}"
