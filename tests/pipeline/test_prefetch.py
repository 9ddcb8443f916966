"""The read-ahead stream returns exactly the bytes, in order, and surfaces read errors where they happen."""

from __future__ import annotations

import io
import os

import pytest

from pipeline.prefetch import ReadAhead


def test_bytes_are_exact_with_odd_read_sizes() -> None:
    data = os.urandom(1_000_003)
    stream = io.BufferedReader(ReadAhead(io.BytesIO(data), chunk=4096, depth=2))
    parts, size = [], 1
    while chunk := stream.read(size):
        parts.append(chunk)
        size = size * 3 % 10_007 + 1
    assert b"".join(parts) == data
    assert stream.read() == b""
    stream.close()


class _Failing(io.RawIOBase):
    def __init__(self) -> None:
        self.calls = 0

    def readable(self) -> bool:
        return True

    def readinto(self, b) -> int:
        self.calls += 1
        if self.calls > 2:
            raise ConnectionResetError("connection dropped mid-shard")
        b[:10] = b"x" * 10
        return 10


def test_errors_surface_after_the_good_bytes() -> None:
    stream = ReadAhead(io.BufferedReader(_Failing(), buffer_size=10), chunk=10, depth=4)
    assert stream.read(10) == b"x" * 10 and stream.read(10) == b"x" * 10
    with pytest.raises(ConnectionResetError, match="mid-shard"):
        stream.read(10)
    stream.close()
