"""Ray Train's own accesses to the run's storage (its checkpoint index, written at every registration,
rotation, a restored checkpoint's download) with retries that outlast an outage our uploads wait out.

On S3 this is pyarrow's S3 client with ``AwsDefaultS3RetryStrategy`` (25 ms, doubling; refused connections,
resets and 503 SlowDown are retried) and enough attempts for the delays to add up to ``data.storage_retry_s``,
and to at least ``MIN_WINDOW_S``: a write that Ray's controller gives up on fails the whole attempt (it is
the index of the registered checkpoints), while one of ours that fails only skips a checkpoint.
pyarrow drops the retry strategy when it pickles an ``S3FileSystem`` (Ray ships the run config to its
controller actor), so the client is built where it is used, behind a picklable ``FileSystemHandler``.
"""

from __future__ import annotations

import math
import os
from urllib.parse import urlparse

import pyarrow.fs as pafs

from pipeline import storage

FIRST_DELAY_S = 0.025  # the AWS SDK's default strategy: 25 ms * 2**attempt
MIN_WINDOW_S = 300.0


def ray_storage(storage_path: str, retry_window_s: float) -> tuple[str, pafs.FileSystem | None]:
    """``(storage_path, storage_filesystem)`` for ``RunConfig``: a retrying S3 client for ``s3://``, else
    Ray's default (None)."""
    if not storage_path.startswith("s3://"):
        return storage_path, None
    attempts = math.ceil(math.log2(max(retry_window_s, MIN_WINDOW_S) / FIRST_DELAY_S + 1))
    options: dict = {}
    endpoint = storage.s3_endpoint()
    if endpoint:
        parsed = urlparse(endpoint)
        options.update(endpoint_override=parsed.netloc, scheme=parsed.scheme or "https")
    elif not (os.environ.get("AWS_DEFAULT_REGION") or os.environ.get("AWS_REGION")):
        try:
            options["region"] = pafs.resolve_s3_region(urlparse(storage_path).netloc)
        except OSError:
            pass  # pyarrow's default region: Ray's own client would have failed the same way
    return storage_path.removeprefix("s3://"), pafs.PyFileSystem(RetryingS3(options, attempts))


class RetryingS3(pafs.FileSystemHandler):
    """Every call goes to a pyarrow ``S3FileSystem(**options)`` with ``attempts`` retries, made on first use
    in each process."""

    def __init__(self, options: dict, attempts: int) -> None:
        self.options, self.attempts = options, attempts
        self._fs: pafs.S3FileSystem | None = None

    def __getstate__(self) -> dict:
        return {"options": self.options, "attempts": self.attempts, "_fs": None}

    @property
    def fs(self) -> pafs.S3FileSystem:
        if self._fs is None:
            strategy = pafs.AwsDefaultS3RetryStrategy(max_attempts=self.attempts)
            self._fs = pafs.S3FileSystem(retry_strategy=strategy, **self.options)
        return self._fs

    def get_type_name(self) -> str:
        return "s3"

    def equals(self, other) -> bool:
        return isinstance(other, RetryingS3) and (other.options, other.attempts) == (self.options, self.attempts)

    def normalize_path(self, path: str) -> str:
        return self.fs.normalize_path(path)

    def get_file_info(self, paths: list[str]) -> list[pafs.FileInfo]:
        return self.fs.get_file_info(paths)

    def get_file_info_selector(self, selector: pafs.FileSelector) -> list[pafs.FileInfo]:
        return self.fs.get_file_info(selector)

    def create_dir(self, path: str, recursive: bool) -> None:
        self.fs.create_dir(path, recursive=recursive)

    def delete_dir(self, path: str) -> None:
        self.fs.delete_dir(path)

    def delete_dir_contents(self, path: str, missing_dir_ok: bool = False) -> None:
        self.fs.delete_dir_contents(path, missing_dir_ok=missing_dir_ok)

    def delete_root_dir_contents(self) -> None:
        raise ValueError("refusing to delete the contents of every bucket")

    def delete_file(self, path: str) -> None:
        self.fs.delete_file(path)

    def move(self, src: str, dest: str) -> None:
        self.fs.move(src, dest)

    def copy_file(self, src: str, dest: str) -> None:
        self.fs.copy_file(src, dest)

    def open_input_stream(self, path: str):
        return self.fs.open_input_stream(path)

    def open_input_file(self, path: str):
        return self.fs.open_input_file(path)

    def open_output_stream(self, path: str, metadata):
        return self.fs.open_output_stream(path, metadata=metadata)

    def open_append_stream(self, path: str, metadata):
        return self.fs.open_append_stream(path, metadata=metadata)
