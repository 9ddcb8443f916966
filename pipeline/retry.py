"""Retrying object-storage calls over a time window, with exponential backoff and jitter.

botocore retries each request itself (``standard`` mode: throttling, 5xx and connection errors, with
jittered backoff; s3fs's own loop is set to one try); this loop is for what botocore does not cover: an
outage longer than its few seconds, the overall window, and a message that names the URI.
Errors that waiting cannot fix (a missing object, access denied) are not retried.

The window is ``DEFAULT_WINDOW_S`` for set-up and tools (a wrong endpoint fails within seconds); a training
worker sets ``data.storage_retry_s`` with ``configure``. Each retry is counted in ``RETRIES`` and logged at
most once per URI per minute.
"""

from __future__ import annotations

import logging
import os
import random
import threading
import time
from collections import Counter
from collections.abc import Callable
from typing import TypeVar

log = logging.getLogger(__name__)
T = TypeVar("T")

DEFAULT_WINDOW_S = 20.0
BASE_DELAY_S = 0.5
MAX_DELAY_S = 15.0
LOG_EVERY_S = 60.0

RETRIES: Counter[str] = Counter()  # retries of this process, by what was retried ("reading", "writing", ...)
_settings = {"window_s": DEFAULT_WINDOW_S}
_last_logged: dict[str, float] = {}
_lock = threading.Lock()
_rng = random.Random()


class StorageError(OSError):
    """Storage could not be reached or read within the retry window; the message names the URI and what to
    check."""


class MissingObject(StorageError, FileNotFoundError):
    """The object is not there: not retried (waiting does not bring it back)."""


class AccessDenied(StorageError, PermissionError):
    """The credentials may not do this: not retried."""


def configure(window_s: float) -> None:
    """The retry window of this process from now on (a training worker: ``data.storage_retry_s``)."""
    if window_s < 0:
        raise ValueError(f"the storage retry window must be >= 0 seconds, got {window_s}")
    _settings["window_s"] = float(window_s)


def window() -> float:
    return _settings["window_s"]


def backoff(attempt: int) -> float:
    """Seconds before retry ``attempt`` (1, 2, ...): exponential, capped, with full jitter."""
    return _rng.uniform(BASE_DELAY_S, min(MAX_DELAY_S, BASE_DELAY_S * 2**attempt))


def final(error: BaseException) -> StorageError | None:
    """The error to raise at once for ``error``, or None when waiting may help."""
    if isinstance(error, FileNotFoundError):
        return MissingObject(f"{error}")
    if isinstance(error, PermissionError):
        return AccessDenied(f"{error}")
    return None


def call(
    what: str,
    uri: str,
    fn: Callable[[], T],
    window_s: float | None = None,
    on_retry: Callable[[BaseException], None] | None = None,
) -> T:
    """``fn()``, retried on transient errors until ``window_s`` (default: ``window()``) has passed since the
    first failure; then ``StorageError`` naming ``uri``. ``on_retry(error)`` before each retry (counters)."""
    limit = window() if window_s is None else window_s
    started, attempt = None, 0
    while True:
        try:
            return fn()
        except StorageError:
            raise  # an inner call has retried already
        except Exception as e:  # s3fs/aiobotocore raise many types: connection, timeout, client errors
            now = time.monotonic()
            started = now if started is None else started
            attempt += 1
            stop = final(e)
            if stop is not None:
                raise type(stop)(explain(what, uri, e, attempt, now - started)) from e
            if now - started >= limit:
                raise StorageError(explain(what, uri, e, attempt, now - started)) from e
            delay = min(backoff(attempt), max(0.0, limit - (now - started)))
            note(what, uri, e, attempt, delay)
            if on_retry is not None:
                on_retry(e)
            time.sleep(delay)


def note(what: str, uri: str, error: BaseException, attempt: int, delay: float) -> None:
    """Counts a retry; logs it unless this URI was logged less than a minute ago."""
    with _lock:
        RETRIES[what] += 1
        now = time.monotonic()
        if now - _last_logged.get(uri, -LOG_EVERY_S) < LOG_EVERY_S:
            return
        _last_logged[uri] = now
    log.warning("%s %s failed (%s: %s); retry %d in %.1fs (storage retries are logged once a minute per object)",
                what, uri, type(error).__name__, _short(error), attempt, delay)  # fmt: skip


def s3_endpoint() -> str | None:
    """The S3 endpoint every client of ours uses: ``AWS_ENDPOINT_URL_S3``, else ``AWS_ENDPOINT_URL``, else
    None (AWS's own)."""
    return os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")


def explain(what: str, uri: str, error: BaseException, attempts: int, seconds: float) -> str:
    hint = ""
    if uri.startswith("s3://"):
        endpoint = s3_endpoint() or "AWS default"
        hint = f" Check the endpoint ({endpoint}; set AWS_ENDPOINT_URL), the credentials and that the bucket exists."
    elif isinstance(error, FileNotFoundError):
        hint = " Check the path."
    if isinstance(error, PermissionError):
        hint = " These credentials may not do this: give them the permission, or use others."
    tries = f"after {attempts} attempts over {seconds:.0f} s" if attempts > 1 else "at once"
    return f"{what} {uri} failed {tries}: {type(error).__name__}: {_short(error)}.{hint}"


def _short(error: BaseException) -> str:
    text = str(error).strip().replace("\n", " ")
    return text[:300] if text else "(no message)"
