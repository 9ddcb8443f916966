"""Object storage through fsspec: local folders, file://, s3:// (s3fs), gs://; retries with backoff.

S3 endpoints and credentials come from the standard AWS sources (``AWS_ENDPOINT_URL``,
``AWS_ACCESS_KEY_ID``/``AWS_SECRET_ACCESS_KEY``, profiles, instance roles).
"""

from __future__ import annotations

import importlib
import logging
import os
import uuid
from collections.abc import Callable
from typing import IO, TypeVar

import fsspec

from pipeline.resumable import ResumableReader
from pipeline.retry import AccessDenied, MissingObject, StorageError, configure, s3_endpoint, window
from pipeline.retry import call as with_retries

__all__ = ["AccessDenied", "MissingObject", "StorageError", "configure", "s3_endpoint", "window", "with_retries"]

log = logging.getLogger(__name__)
T = TypeVar("T")
BOTOCORE_ATTEMPTS = 4  # per request, botocore's own (standard mode); our window is around them
STREAM_BLOCK = 8 << 20  # bytes per ranged GET of a streamed shard: a break costs at most this much again


def filesystem(uri: str) -> tuple[fsspec.AbstractFileSystem, str]:
    """``(filesystem, path inside it)`` for a URI; plain paths are local."""
    options: dict[str, object] = {}
    if uri.startswith("s3://"):
        endpoint = s3_endpoint()
        if endpoint:
            options["client_kwargs"] = {"endpoint_url": endpoint}
        # botocore retries each request (standard mode: throttling, 5xx and connection errors, with jittered
        # backoff); a read that stalls ends after read_timeout. Not adaptive mode: its client-side rate
        # limiter, after a burst of SlowDown, held a single write for minutes (beyond any window of ours).
        retries = {"mode": "standard", "max_attempts": BOTOCORE_ATTEMPTS}
        options["config_kwargs"] = {"connect_timeout": 5, "read_timeout": 30, "retries": retries}
        options["skip_instance_cache"] = True
    fs, path = fsspec.core.url_to_fs(uri, **options)
    if uri.startswith("s3://"):
        fs.retries = 1  # s3fs's own loop (5 tries of botocore's 4) would hide outages from pipeline.retry's window
    return fs, path


def absolute(uri: str) -> str:
    """An object-storage URI as it is; a local path made absolute against this process's folder."""
    return uri if "://" in uri else os.path.realpath(uri)


def join(uri: str, name: str) -> str:
    return uri.rstrip("/") + "/" + name


def open_uri(uri: str, mode: str = "rb") -> IO[bytes]:
    """Opens a file for streaming (reads are not staged to local disk), with retries."""
    fs, path = filesystem(uri)
    kwargs = {"block_size": 8 << 20, "cache_type": "readahead"} if "r" in mode and uri.startswith("s3://") else {}
    return with_retries("opening", uri, lambda: fs.open(path, mode, **kwargs))


def open_stream(uri: str, on_retry: Callable[[BaseException], None] | None = None) -> IO[bytes]:
    """``uri`` opened for reading start to end (a shard): a local file as it is; an object through
    ``ResumableReader``, which re-opens it where a transient failure broke the stream (a ranged read), so
    the reader never sees an outage as the end of the data. ``on_retry`` is called for each re-open."""
    fs, path = filesystem(uri)
    if _is_local(fs):
        return with_retries("opening", uri, lambda: fs.open(path, "rb"))
    length = with_retries("opening", uri, lambda: int(fs.info(path)["size"]), on_retry=on_retry)

    # fs.retries is 1: a failure in the middle of a read surfaces at once (not after s3fs's own retries of the
    # same range), so that it is re-opened where it broke, counted and logged.
    def open_at(offset: int) -> IO[bytes]:
        f = fs.open(path, "rb", block_size=STREAM_BLOCK, cache_type="readahead", size=length)
        f.seek(offset)
        return f

    return ResumableReader(uri, length, open_at, on_retry)


def read_bytes(uri: str) -> bytes:
    fs, path = filesystem(uri)
    return with_retries("reading", uri, lambda: fs.cat_file(path))


def write_bytes(uri: str, data: bytes, window_s: float | None = None) -> None:
    """Writes a whole object (retried over ``window_s``, default the process's window); local files go
    through a temporary name so a reader never sees half."""
    fs, path = filesystem(uri)
    if _is_local(fs):
        fs.makedirs(fs._parent(path), exist_ok=True)
        tmp = f"{path}.tmp-{os.getpid()}"
        with_retries("writing", uri, lambda: fs.pipe_file(tmp, data), window_s)
        os.replace(tmp, path)
        return
    with_retries("writing", uri, lambda: fs.pipe_file(path, data), window_s)


def delete(uri: str, window_s: float | None = None) -> None:
    """Removes the object (or local file) at ``uri``; nothing happens if there is none."""
    fs, path = filesystem(uri)

    def remove() -> None:
        try:
            fs.rm_file(path)
        except FileNotFoundError:
            pass

    with_retries("deleting", uri, remove, window_s)


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
    """Fails early (``StorageError`` naming ``uri``) when ``uri`` cannot be written to later: local folders
    are created; in object storage the bucket must exist and a small object is written and deleted."""
    fs, path = filesystem(uri)
    if _is_local(fs):
        with_retries("creating", uri, lambda: fs.makedirs(path, exist_ok=True))
        return
    bucket = path.split("/", 1)[0]

    def probe() -> None:
        if not fs.exists(bucket):
            raise FileNotFoundError(f"bucket {bucket!r} does not exist or is not visible with these credentials")

    with_retries("checking", uri, probe)
    check_writable(uri)


def check_writable(uri: str, window_s: float | None = None) -> None:
    """Writes and deletes a small object under ``uri``: ``StorageError`` (``AccessDenied`` at once for read-only
    credentials) if this process may not write there."""
    check = join(uri, f".write-check-{uuid.uuid4().hex[:8]}")
    write_bytes(check, b"ok", window_s)
    delete(check, window_s)


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
