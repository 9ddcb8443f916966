"""Checks one input image as it is written to a shard: fully decodable, size equal to its annotation.

JPEG bytes pass through unchanged (never re-encoded; grayscale and CMYK stay as they are, the decoder
makes them RGB). Other formats (PNG, BMP, ...) are converted to an RGB JPEG at ``JPEG_QUALITY``.
"""

from __future__ import annotations

import io
import warnings
from dataclasses import dataclass

from PIL import Image, UnidentifiedImageError

JPEG_QUALITY = 95


@dataclass(frozen=True)
class CheckedImage:
    """JPEG bytes ready for a shard, or ``None`` and the reason the image is skipped."""

    jpeg: bytes | None
    reason: str = ""
    converted_from: str | None = None  # the source format when it was re-encoded


def check_image(data: bytes, width: int, height: int) -> CheckedImage:
    """Decodes ``data`` fully with PIL and compares its size with the annotation's ``width`` x ``height``."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data))
            image_format = image.format or "unknown"
            image.load()  # the whole image: truncated or corrupt entropy data fails here, not at open
    except UnidentifiedImageError:  # its message holds an object address: not reproducible from run to run
        return CheckedImage(None, "undecodable image (not a known image format, or a corrupt header)")
    except Exception as e:  # PIL raises OSError, SyntaxError, ValueError... depending on the codec
        return CheckedImage(None, f"undecodable image ({type(e).__name__}: {e})")
    if image.size != (width, height):
        return CheckedImage(
            None, f"decoded size {image.size[0]}x{image.size[1]} differs from the annotation's {width}x{height}"
        )
    if image_format == "JPEG":
        return CheckedImage(data)
    out = io.BytesIO()
    image.convert("RGB").save(out, format="JPEG", quality=JPEG_QUALITY)
    return CheckedImage(out.getvalue(), converted_from=image_format)
