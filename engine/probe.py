"""What a worker checks before training, run as a Ray task: light to import (no torch, no Ray Train)."""

from __future__ import annotations

from pipeline import storage

PROBE_WINDOW_S = 20.0


def try_write(run_uri: str) -> str | None:
    """``storage.check_writable(run_uri)`` from this process; the error as text, or None when it may write."""
    try:
        storage.check_writable(run_uri, PROBE_WINDOW_S)
    except storage.StorageError as e:
        return str(e)
    return None
