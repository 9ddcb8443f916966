"""Cheap structural checks of JPEG bytes, so that a broken file never reaches the DALI decoder
(one undecodable JPEG invalidates a whole DALI pipeline without naming the sample)."""

from __future__ import annotations

# Start-of-frame markers that carry the image size (not DHT 0xC4, JPG 0xC8, DAC 0xCC).
_SOF = {0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF}
_STANDALONE = {0x01, *range(0xD0, 0xD8)}


def jpeg_size(data: bytes) -> tuple[int, int]:
    """``(height, width)`` from the frame header; ``ValueError`` naming what is broken.

    Checks: the start-of-image marker, a well-formed chain of header segments up to the frame header,
    and an end-of-image marker in the last bytes (a truncated file has none). Entropy-coded data is not
    checked: libjpeg-turbo decodes damaged data with a warning instead of failing.
    """
    if len(data) < 4 or data[:2] != b"\xff\xd8":
        raise ValueError("not a JPEG (no start-of-image marker)")
    if b"\xff\xd9" not in data[-64:]:
        raise ValueError("truncated JPEG (no end-of-image marker)")
    pos = 2
    while pos + 4 <= len(data):
        if data[pos] != 0xFF:
            raise ValueError(f"corrupt JPEG header (no marker at byte {pos})")
        marker = data[pos + 1]
        if marker == 0xFF:  # fill byte
            pos += 1
            continue
        if marker in _STANDALONE:
            pos += 2
            continue
        length = int.from_bytes(data[pos + 2 : pos + 4], "big")
        if length < 2 or pos + 2 + length > len(data):
            raise ValueError(f"corrupt JPEG header (segment 0x{marker:02X} overruns the file)")
        if marker in _SOF:
            if length < 7:
                raise ValueError("corrupt JPEG frame header")
            height = int.from_bytes(data[pos + 5 : pos + 7], "big")
            width = int.from_bytes(data[pos + 7 : pos + 9], "big")
            if height == 0 or width == 0:
                raise ValueError(f"JPEG frame header gives an empty image ({width}x{height})")
            return height, width
        if marker == 0xDA:  # start of scan before any frame header
            break
        pos += 2 + length
    raise ValueError("corrupt JPEG header (no frame header)")
