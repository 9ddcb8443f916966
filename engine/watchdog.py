"""The stall watchdog: a rank on which no training step completes for ``optim.stall_timeout_s`` (evaluation
and checkpoint writes excluded) dumps the Python stacks of all its threads to its log and ends its process.
Ray Train then restarts the worker group from the last checkpoint, instead of every rank waiting forever in
a collective for a rank that is stuck (a read that never returns, a hung peer)."""

from __future__ import annotations

import contextlib
import faulthandler
import os
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

STALL_EXIT_CODE = 75
FIRST_STEP_FACTOR = 3  # the first step also builds the data pipeline and may compile the network


class StallWatchdog:
    """``beat()`` after each step; ``paused()`` around work that may take long. ``timeout_s=0``: off."""

    def __init__(self, timeout_s: float, rank: int, log_dir: Path) -> None:
        self.timeout_s, self.rank, self.log_dir = timeout_s, rank, log_dir
        self._last = time.monotonic()
        self._limit = timeout_s * FIRST_STEP_FACTOR
        self._paused = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, name="stall-watchdog", daemon=True)

    def __enter__(self) -> StallWatchdog:
        if self.timeout_s > 0:
            self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()

    def beat(self) -> None:
        self._last, self._limit = time.monotonic(), self.timeout_s

    @contextlib.contextmanager
    def paused(self, pause: bool = True) -> Iterator[None]:
        if not pause:
            yield
            return
        self._paused += 1
        try:
            yield
        finally:
            self._paused -= 1
            self._last = time.monotonic()

    def _watch(self) -> None:
        while not self._stop.wait(min(5.0, max(0.5, self.timeout_s / 4))):
            if not self._paused and time.monotonic() - self._last > self._limit:
                self._fire(time.monotonic() - self._last)

    def _fire(self, stalled: float) -> None:
        message = (
            f"error: rank {self.rank}: no training step completed in {stalled:.0f} s (optim.stall_timeout_s="
            f"{self.timeout_s:g}); the Python stacks of every thread of this rank follow. This attempt fails and "
            "the run restarts from its last checkpoint."
        )
        print(message, file=sys.stderr, flush=True)
        faulthandler.dump_traceback(file=sys.stderr, all_threads=True)
        with contextlib.suppress(OSError):
            self.log_dir.mkdir(parents=True, exist_ok=True)
            with open(self.log_dir / f"stall-rank{self.rank}-{os.getpid()}.txt", "w") as f:
                f.write(message + "\n")
                f.flush()
                faulthandler.dump_traceback(file=f, all_threads=True)
        sys.stderr.flush()
        os._exit(STALL_EXIT_CODE)
