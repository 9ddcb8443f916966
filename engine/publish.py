"""Rank 0's progress files (metrics.jsonl, PNGs, TensorBoard events) published to object storage, so that a
run can be followed from anywhere while rank 0 runs on some worker node."""

from __future__ import annotations

from pathlib import Path

from pipeline import storage


class LogPublisher:
    """Uploads the files of ``log_dir`` that changed since the last call to ``{run_uri}/logs/``. A local
    storage path already holds them (the log folder is beside the checkpoints): then it does nothing."""

    def __init__(self, log_dir: Path, run_uri: str, rank: int) -> None:
        self.log_dir, self.rank = log_dir, rank
        self.root = storage.join(run_uri, "logs") if "://" in run_uri else None
        self._published: dict[Path, tuple[int, int]] = {}

    def publish(self, window_s: float | None = None) -> None:
        """Never raises for storage: a file that could not be uploaded (within ``window_s``) is tried again at
        the next call; training does not stop for progress files."""
        if self.rank != 0 or self.root is None or not self.log_dir.exists():
            return
        files = [p for p in self.log_dir.rglob("*") if p.is_file() and not p.name.startswith(".")]
        for path in sorted(files):
            stat = path.stat()
            if self._published.get(path) == (stat.st_size, stat.st_mtime_ns):
                continue
            remote = storage.join(self.root, path.relative_to(self.log_dir).as_posix())
            try:
                storage.write_bytes(remote, path.read_bytes(), window_s)
            except storage.StorageError as e:
                print(f"WARNING: progress files not published yet ({e}); trying again at the next report", flush=True)
                return
            self._published[path] = (stat.st_size, stat.st_mtime_ns)
