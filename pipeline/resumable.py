"""A read stream of one object that survives transient failures: a reset, a timeout, a refused connection,
an answer cut short. It re-opens the object at the byte it had reached (a ranged read) and goes on, with
backoff over the retry window. It ends only at the object's size, so a shard that ends inside a tar member
was really written short, and one that cannot be read within the window raises ``StorageError`` naming it.
"""

from __future__ import annotations

import io
import time
from collections.abc import Callable
from typing import IO

from pipeline import retry


class ResumableReader(io.RawIOBase):
    """``open_at(offset)`` opens the object positioned at ``offset``; ``size`` is its length in bytes;
    ``on_retry(error)`` is called before each re-open (for counters)."""

    def __init__(
        self,
        uri: str,
        size: int,
        open_at: Callable[[int], IO[bytes]],
        on_retry: Callable[[BaseException], None] | None = None,
    ) -> None:
        super().__init__()
        self.uri, self.size, self._open_at, self._on_retry = uri, size, open_at, on_retry
        self._pos = 0
        self._file: IO[bytes] | None = None
        self._failing_since: float | None = None
        self._attempt = 0

    def readable(self) -> bool:
        return True

    def tell(self) -> int:
        return self._pos

    def readinto(self, b) -> int:  # type: ignore[override]
        if self._pos >= self.size or len(b) == 0:
            return 0
        while True:
            try:
                if self._file is None:
                    self._file = self._open_at(self._pos)
                data = self._file.read(min(len(b), self.size - self._pos))
                if not data:
                    raise EOFError(f"the stream ended at byte {self._pos} of {self.size}")
            except retry.StorageError:
                raise
            except Exception as e:  # connection, timeout, payload errors of s3fs/aiobotocore/aiohttp
                self._recover(e)
                continue
            n = len(data)
            b[:n] = data
            self._pos += n
            self._failing_since, self._attempt = None, 0
            return n

    def _recover(self, error: BaseException) -> None:
        """Closes the broken stream and waits before the next re-open, or raises once the window is spent."""
        self._close_file()
        stop = retry.final(error)
        now = time.monotonic()
        self._failing_since = now if self._failing_since is None else self._failing_since
        self._attempt += 1
        spent = now - self._failing_since
        what = f"reading (at byte {self._pos} of {self.size})"
        if stop is not None:
            raise type(stop)(retry.explain(what, self.uri, error, self._attempt, spent)) from error
        if spent >= retry.window():
            raise retry.StorageError(retry.explain(what, self.uri, error, self._attempt, spent)) from error
        delay = min(retry.backoff(self._attempt), max(0.0, retry.window() - spent))
        retry.note("reading", self.uri, error, self._attempt, delay)
        if self._on_retry is not None:
            self._on_retry(error)
        time.sleep(delay)

    def _close_file(self) -> None:
        if self._file is not None:
            try:
                self._file.close()
            except Exception:  # a broken connection may fail to close; it is dropped either way
                pass
            self._file = None

    def close(self) -> None:
        self._close_file()
        super().close()
