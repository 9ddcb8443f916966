"""Object storage through fsspec: local folders, file://, s3:// (s3fs), gs://; retries with backoff.

S3 endpoints and credentials come from the standard AWS sources (``AWS_ENDPOINT_URL``,
``AWS_ACCESS_KEY_ID``/``AWS_SECRET_ACCESS_KEY``, profiles, instance roles).
"""

from __future__ import annotations

import importlib
import logging
import os
import time
from collections.abc import Callable
from typing import IO, TypeVar

import fsspec

log = logging.getLogger(__name__)
T = TypeVar("T")

RETRY_ATTEMPTS = 4
RETRY_BASE_DELAY_S = 0.5


class StorageError(OSError):
    """Storage could not be reached or read after retries; the message names the URI and what to check."""


class MissingObject(StorageError, FileNotFoundError):
    """The object is not there: not retried (waiting does not bring it back)."""


def filesystem(uri: str) -> tuple[fsspec.AbstractFileSystem, str]:
    """``(filesystem, path inside it)`` for a URI; plain paths are local."""
    options: dict[str, object] = {}
    if uri.startswith("s3://"):
        endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
        if endpoint:
            options["client_kwargs"] = {"endpoint_url": endpoint}
        # Fail fast inside one attempt; our own retry loop does the backoff and names the URI.
        options["config_kwargs"] = {"connect_timeout": 5, "read_timeout": 60, "retries": {"max_attempts": 2}}
        options["skip_instance_cache"] = True
    fs, path = fsspec.core.url_to_fs(uri, **options)
    return fs, path


def absolute(uri: str) -> str:
    """An object-storage URI as it is; a local path made absolute against this process's folder."""
    return uri if "://" in uri else os.path.realpath(uri)


def join(uri: str, name: str) -> str:
    return uri.rstrip("/") + "/" + name


def with_retries(what: str, uri: str, fn: Callable[[], T], attempts: int = RETRY_ATTEMPTS) -> T:
    """Runs ``fn``, retrying on storage errors with exponential backoff; then raises ``StorageError``."""
    delay = RETRY_BASE_DELAY_S
    for attempt in range(1, attempts + 1):
        try:
            return fn()
        except FileNotFoundError as e:
            raise MissingObject(_explain(what, uri, e, attempt)) from e
        except Exception as e:  # s3fs/aiobotocore raise many types: connection, timeout, client errors
            if attempt == attempts:
                raise StorageError(_explain(what, uri, e, attempt)) from e
            log.warning("%s %s failed (%s: %s); retry %d/%d in %.1fs", what, uri, type(e).__name__, e, attempt,
                        attempts - 1, delay)  # fmt: skip
            time.sleep(delay)
            delay *= 2
    raise AssertionError("unreachable")


def open_uri(uri: str, mode: str = "rb") -> IO[bytes]:
    """Opens a file for streaming (reads are not staged to local disk), with retries."""
    fs, path = filesystem(uri)
    kwargs = {"block_size": 8 << 20, "cache_type": "readahead"} if "r" in mode and uri.startswith("s3://") else {}
    return with_retries("opening", uri, lambda: fs.open(path, mode, **kwargs))


def read_bytes(uri: str) -> bytes:
    fs, path = filesystem(uri)
    return with_retries("reading", uri, lambda: fs.cat_file(path))


def write_bytes(uri: str, data: bytes) -> None:
    """Writes a whole object; local files go through a temporary name so a reader never sees half."""
    fs, path = filesystem(uri)
    if _is_local(fs):
        fs.makedirs(fs._parent(path), exist_ok=True)
        tmp = f"{path}.tmp-{os.getpid()}"
        with_retries("writing", uri, lambda: fs.pipe_file(tmp, data))
        os.replace(tmp, path)
        return
    with_retries("writing", uri, lambda: fs.pipe_file(path, data))


def delete(uri: str) -> None:
    """Removes the object (or local file) at ``uri``; nothing happens if there is none."""
    fs, path = filesystem(uri)

    def remove() -> None:
        try:
            fs.rm_file(path)
        except FileNotFoundError:
            pass

    with_retries("deleting", uri, remove)


def size(uri: str) -> int | None:
    """The size of the object at ``uri``, or ``None`` if there is none (one metadata request)."""
    fs, path = filesystem(uri)

    def info() -> int | None:
        try:
            return int(fs.info(path)["size"])
        except FileNotFoundError:
            return None

    return with_retries("checking", uri, info)


def ensure_reachable(uri: str) -> None:
    """Fails early (``StorageError`` naming ``uri``) when ``uri`` cannot be written to later: local
    folders are created; for object stores the bucket must exist (checked without writing)."""
    fs, path = filesystem(uri)
    if _is_local(fs):
        with_retries("creating", uri, lambda: fs.makedirs(path, exist_ok=True))
        return
    bucket = path.split("/", 1)[0]

    def probe() -> None:
        if not fs.exists(bucket):
            raise FileNotFoundError(f"bucket {bucket!r} does not exist or is not visible with these credentials")

    with_retries("checking", uri, probe)


def exists(uri: str) -> bool:
    fs, path = filesystem(uri)
    return with_retries("checking", uri, lambda: fs.exists(path))


def list_matching(uri: str, pattern: str) -> list[str]:
    """URIs of the objects directly under ``uri`` whose names match the glob ``pattern`` (no ``/``), sorted,
    each spelled as ``join(uri, name)``: a relative local ``uri`` gives relative paths."""
    if "/" in pattern:
        raise ValueError(f"list_matching matches names directly under {uri}, got the pattern {pattern!r}")
    fs, path = filesystem(uri)
    found = with_retries("listing", uri, lambda: fs.glob(path.rstrip("/") + "/" + pattern))
    return sorted(join(uri, p.rstrip("/").rsplit("/", 1)[-1]) for p in found)


def register_webdataset_openers() -> None:
    """Lets ``webdataset`` open s3://, gs:// and file:// URLs through fsspec (it has no s3 opener)."""
    gopen = importlib.import_module("webdataset.gopen")  # the package re-exports a function of that name

    def opener(url: str, mode: str = "rb", bufsize: int = 8192, **_: object) -> IO[bytes]:
        return open_uri(url, mode)

    for scheme in ("s3", "gs", "gcs", "file"):
        gopen.gopen_schemes[scheme] = opener


def _is_local(fs: fsspec.AbstractFileSystem) -> bool:
    protocols = fs.protocol if isinstance(fs.protocol, tuple) else (fs.protocol,)
    return "file" in protocols


def _explain(what: str, uri: str, error: Exception, attempts: int) -> str:
    hint = ""
    if uri.startswith("s3://"):
        endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL") or "AWS default"
        hint = f" Check the endpoint ({endpoint}; set AWS_ENDPOINT_URL), the credentials and that the bucket exists."
    elif isinstance(error, FileNotFoundError):
        hint = " Check the path."
    tries = f"after {attempts} attempts" if attempts > 1 else "at once"
    return f"{what} {uri} failed {tries}: {type(error).__name__}: {error}.{hint}"
