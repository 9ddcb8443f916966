"""A file object that reads ahead in a background thread: network reads overlap with decoding, while
at most ``depth * chunk`` bytes of a stream are held in memory (never a whole shard)."""

from __future__ import annotations

import io
import queue
import threading
from typing import IO

_END = object()


class ReadAhead(io.RawIOBase):
    """Wraps a readable binary file; ``read`` is served from chunks fetched ahead by a daemon thread.
    An error in the thread is raised from ``read`` at the point of the stream where it happened."""

    def __init__(self, raw: IO[bytes], chunk: int = 4 << 20, depth: int = 4) -> None:
        super().__init__()
        self._raw, self._chunk = raw, chunk
        self._queue: queue.Queue = queue.Queue(maxsize=depth)
        self._buffer = memoryview(b"")
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._fill, name="shard-read-ahead", daemon=True)
        self._thread.start()

    def _fill(self) -> None:
        try:
            while not self._stop.is_set():
                data = self._raw.read(self._chunk)
                if not data:
                    break
                self._put(data)
            self._put(_END)
        except BaseException as e:  # handed to the reader thread
            self._put(e)

    def _put(self, item: object) -> None:
        while not self._stop.is_set():
            try:
                self._queue.put(item, timeout=0.1)
                return
            except queue.Full:
                continue

    def readable(self) -> bool:
        return True

    def readinto(self, b) -> int:  # type: ignore[override]
        if not self._buffer:
            item = self._next_item()
            if item is _END:
                self._queue.put(_END)  # later reads see the end too
                return 0
            if isinstance(item, BaseException):
                raise item
            self._buffer = memoryview(item)
        n = min(len(b), len(self._buffer))
        b[:n] = self._buffer[:n]
        self._buffer = self._buffer[n:]
        return n

    def _next_item(self) -> object:
        """The next chunk, end or error. Never waits unbounded on a thread that is gone: the thread's own
        reads are bounded (storage timeouts and retry window), so a queue that stays empty while the thread
        is dead can only mean it ended without a word."""
        while True:
            try:
                return self._queue.get(timeout=1.0)
            except queue.Empty:
                if not self._thread.is_alive() and self._queue.empty():
                    raise OSError("the read-ahead thread ended without handing over the rest of the stream") from None

    def close(self) -> None:
        if not self.closed:
            self._stop.set()
            self._thread.join(timeout=5)
            self._raw.close()
        super().close()
