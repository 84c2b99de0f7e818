"""Folders in object storage or behind HTTP, through fsspec: s3:// (s3fs), gs:// (gcsfs),
http(s):// (aiohttp; read only). Shards and their manifest are read from them (data.shards),
anytime models written to them (checkpoint.anytime_to). Credentials come from each library's
standard places (for S3: the AWS_* environment variables, ~/.aws, instance roles;
AWS_ENDPOINT_URL for an S3-compatible server); this module never sees or logs them. Every
URL it puts in a message goes through `redact`.

No other scheme is opened: in particular not webdataset's `pipe:` (a shell command), so a
manifest or config cannot make a run execute anything.
"""

from __future__ import annotations

import logging
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, TypeVar
from urllib.parse import urlsplit, urlunsplit

from app_dist.foundations.errors import ConfigError, DataError
from app_dist.foundations.files import atomic_write_text

log = logging.getLogger("app_dist")

# scheme -> the package fsspec needs for it (named in the error when it is missing)
REMOTE_SCHEMES = {"s3": "s3fs", "gs": "gcsfs", "gcs": "gcsfs", "http": "aiohttp",
                  "https": "aiohttp"}
CHUNK = 4 << 20
T = TypeVar("T")


class Restartable(Protocol):
    """Where a download goes: written in chunks, emptied when an attempt starts again."""

    def write(self, data: bytes) -> int: ...

    def restart(self) -> None: ...


def scheme_of(location: str) -> str:
    """'' for a local path (a folder, or file://), else the URL's scheme."""
    if "://" not in location:
        return "pipe" if location.startswith("pipe:") else ""
    scheme = location.split("://", 1)[0].lower()
    return "" if scheme == "file" else scheme


def is_remote(location: str) -> bool:
    return scheme_of(location) in REMOTE_SCHEMES


def local_path(location: str) -> str:
    """A local location as a path (file:// URLs unwrapped)."""
    return location[len("file://"):] if location.lower().startswith("file://") else location


def check_location(location: str, key: str = "data.shards", writable: bool = False) -> None:
    """A ConfigError naming `key` unless `location` is a local folder or a supported URL (one
    that can be written to, with `writable`: not http(s))."""
    scheme = scheme_of(location)
    schemes = ("s3", "gs") if writable else ("s3", "gs", "http", "https")
    if scheme and scheme not in schemes:
        supported = ", ".join(f"{s}://" for s in schemes)
        raise ConfigError(f"config key '{key}' = {redact(location)!r}: scheme '{scheme}' is "
                          f"not supported (a local folder, file://, {supported})")


def redact(url: str) -> str:
    """The URL without user info, query string or fragment: what logs and errors show."""
    if "://" not in url:
        return url
    parts = urlsplit(url)
    host = parts.netloc.rsplit("@", 1)[-1]
    return urlunsplit((parts.scheme, host, parts.path, "", ""))


def join(base: str, name: str) -> str:
    """`base`/`name`, keeping base's query string (a token some HTTP servers want)."""
    parts = urlsplit(base)
    return urlunsplit((parts.scheme, parts.netloc, parts.path.rstrip("/") + "/" + name,
                       parts.query, ""))


@dataclass(frozen=True)
class Retry:
    attempts: int = 5  # in all, the first included
    backoff_s: float = 1.0  # wait before the second attempt; doubled before each next one

    def waits(self) -> list[float]:
        return [self.backoff_s * 2 ** i for i in range(self.attempts - 1)]


class LocalFolder:
    """A local folder with RemoteFolder's small-file interface, so code that writes to "a
    folder or a bucket" (a sweep's experiment folder) has one path for both."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(local_path(str(path)))

    def __str__(self) -> str:
        return str(self.path)

    def exists(self, name: str) -> bool:
        return (self.path / name).is_file()

    def read_text(self, name: str) -> str:
        return (self.path / name).read_text()

    def write_text(self, name: str, text: str) -> None:
        """Replaced whole (a rename), as an object put is."""
        self.path.mkdir(parents=True, exist_ok=True)
        atomic_write_text(self.path / name, text)

    def upload(self, local: Path, name: str) -> None:
        """Copy the file in under a hidden name, then rename it: readers see it whole."""
        self.path.mkdir(parents=True, exist_ok=True)
        partial = self.path / f".{name}.partial"
        shutil.copyfile(local, partial)
        partial.replace(self.path / name)


class RemoteFolder:
    """A folder of shards at a URL: read a small file, or stream a shard into the cache."""

    def __init__(self, url: str, retry: Retry, key: str = "data.shards") -> None:
        check_location(url, key)
        self.url = url
        self.retry = retry
        self.key = key  # the config key that named the folder, for errors
        self._fs: Any = None

    def __str__(self) -> str:
        return redact(self.url)

    def exists(self, name: str) -> bool:
        return self._with_retries(name, lambda: self._filesystem().isfile(join(self.url, name)))

    def read_text(self, name: str) -> str:
        """A small file's text (the manifest)."""
        def read() -> bytes:
            with self._open(name) as remote:
                return remote.read()

        data = self._with_retries(name, read)
        try:
            return data.decode("utf-8")
        except UnicodeDecodeError:
            raise DataError(f"{redact(join(self.url, name))}: not UTF-8 text") from None

    def download(self, name: str, out: Restartable) -> None:
        """Stream `name` into `out`; a retried attempt starts again from byte 0."""
        def copy() -> None:
            out.restart()
            with self._open(name) as remote:
                while chunk := remote.read(CHUNK):
                    out.write(chunk)

        self._with_retries(name, copy)

    def upload(self, local: Path, name: str) -> None:
        """Copy the local file to `name` (one object: readers see the old or the new one)."""
        self._with_retries(name, lambda: self._filesystem().put_file(str(local),
                                                                     join(self.url, name)))

    def write_text(self, name: str, text: str) -> None:
        self._with_retries(name, lambda: self._filesystem().pipe_file(join(self.url, name),
                                                                      text.encode("utf-8")))

    def _with_retries(self, name: str, action: Callable[[], T]) -> T:
        """`action()`, again after each transient failure (waits from `retry`); a DataError
        naming the file once the attempts are spent, or at once when it does not exist."""
        waits = self.retry.waits()
        for attempt, wait in enumerate([*waits, None], start=1):
            try:
                return action()
            except Exception as error:  # noqa: BLE001 - each library raises its own kinds
                if _missing(error) or wait is None:
                    raise DataError(self._failure(name, error, attempt)) from None
                log.warning("fetching %s failed (%s); attempt %d of %d in %.1f s",
                            redact(join(self.url, name)), _reason(error), attempt + 1,
                            self.retry.attempts, wait)
                time.sleep(wait)
        raise AssertionError("unreachable: the last attempt raises")

    def _open(self, name: str) -> Any:
        return self._filesystem().open(join(self.url, name), "rb", block_size=CHUNK)

    def _filesystem(self) -> Any:
        if self._fs is None:
            self._fs = filesystem_for(self.url, self.key)
        return self._fs

    def _failure(self, name: str, error: Exception, attempts: int) -> str:
        url = redact(join(self.url, name))
        if _missing(error):
            return f"{url}: no such file"
        return f"{url}: cannot fetch ({_reason(error)}) after {attempts} attempt(s)"


def folder_at(location: str, retry: Retry, key: str) -> LocalFolder | RemoteFolder:
    """The folder `location` names: local (a path or file://) or in object storage."""
    return RemoteFolder(location, retry, key) if is_remote(location) else LocalFolder(location)


def filesystem_for(url: str, key: str = "data.shards") -> Any:
    """fsspec's filesystem for `url`'s scheme; a ConfigError naming the missing package."""
    scheme = scheme_of(url)
    for chatty in ("botocore", "aiobotocore", "s3fs", "fsspec"):
        # At INFO they say where credentials were found, on every rank; warnings stay.
        logging.getLogger(chatty).setLevel(logging.WARNING)
    try:
        import fsspec

        return fsspec.filesystem(scheme)
    except ImportError:
        package = REMOTE_SCHEMES[scheme]
        raise ConfigError(f"config key '{key}' = {redact(url)!r}: {scheme}:// needs the "
                          f"'{package}' package (pip install {package})") from None


def _missing(error: BaseException) -> bool:
    """The file is not there (retrying cannot help), as opposed to a server that did not
    answer. fsspec's HTTP filesystem reports both as FileNotFoundError, caused by aiohttp's
    error: a response status (404: missing; 5xx, 408, 429: transient), or a connection
    error; s3fs's not-found is caused by botocore's ClientError."""
    if not isinstance(error, FileNotFoundError):
        return False
    cause = error.__cause__ or error.__context__
    while cause is not None:
        status = getattr(cause, "status", None)
        if isinstance(status, int):
            return not (status >= 500 or status in (408, 429))
        if not isinstance(cause, FileNotFoundError) and (
                isinstance(cause, (OSError, TimeoutError))
                or type(cause).__module__.startswith("aiohttp")):
            return False
        cause = cause.__cause__ or cause.__context__
    return True


def _reason(error: BaseException) -> str:
    """The most telling message in the error's chain (fsspec's FileNotFoundError says only the
    URL; the connection error beneath it says what happened), redacted, one line."""
    informative, cause = error, error
    while cause is not None:
        if not isinstance(cause, FileNotFoundError):
            informative = cause
            break
        cause = cause.__cause__ or cause.__context__
    lines = str(informative).splitlines()
    return redact_in_text(lines[0] if lines else type(informative).__name__)[:200]


def redact_in_text(text: str) -> str:
    """Every URL inside a library's message, redacted."""
    words = []
    for word in text.split(" "):
        start = word.find("://")
        words.append(redact(word) if start > 0 else word)
    return " ".join(words)
