"""Decoding untrusted image bytes into fixed-size uint8 arrays.

Used by the image-folder dataset, the Ray Data ingest (``jobs/ingest.py``) and the Serve
ingress: all must turn a corrupt, truncated, non-image or oversized input into a clear
:class:`ImageDecodeError` rather than a crash.

Photos are decoded the way a camera meant them to be seen: the EXIF orientation tag is
applied, so a portrait shot stored sideways comes out upright. A JPEG much larger than
the output is decoded at a reduced scale (``Image.draft``: libjpeg's DCT scaling by 1/2,
1/4 or 1/8) that still leaves the shorter side at least ``size`` pixels, which saves
most of the decode time of a 500x375 photo going to 112 px and costs no quality after
the final resize.
"""

from __future__ import annotations

import io
import math
import os
import warnings

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

#: Formats accepted from users (ImageFolder data and HTTP requests).
ALLOWED_FORMATS = frozenset({"JPEG", "PNG", "WEBP", "BMP", "GIF", "TIFF"})
#: Extensions scanned in an image folder.
IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff"})


#: EXIF tag holding the orientation (1 = upright; 2..8 = flips and rotations).
EXIF_ORIENTATION = 0x0112
#: Reasons an :class:`ImageDecodeError` carries, for counts by reason.
DECODE_REASONS = ("empty", "not_an_image", "unsupported_format", "too_large", "corrupt", "unreadable")


class ImageDecodeError(ValueError):
    """An input could not be decoded into an image; the message says why.

    Attributes:
        reason: A short category from :data:`DECODE_REASONS` (``corrupt`` by default),
            for counting skipped files by reason.
    """

    def __init__(self, message: str, reason: str = "corrupt") -> None:
        # ``args`` stays ``(message,)`` and ``reason`` lives in ``__dict__``, so the default
        # exception pickling (Ray tasks) keeps it, and subclasses with other signatures work.
        super().__init__(message)
        self.reason = reason


def decode_image(
    data: bytes | bytearray | memoryview | str | os.PathLike[str],
    size: int,
    *,
    channels: int = 3,
    max_pixels: int = 40_000_000,
) -> np.ndarray:
    """Decode an image and resize it to ``size`` x ``size`` (shorter side, centre crop).

    The EXIF orientation is applied before resizing, and a large JPEG is decoded at a
    reduced DCT scale that keeps its shorter side at least ``size``.

    Args:
        data: Encoded bytes or a file path.
        size: Output side length in pixels.
        channels: 3 for RGB output, 1 for grayscale.
        max_pixels: Decoded images larger than this (width * height) are rejected
            before their pixels are decompressed (decompression bombs).

    Returns:
        ``uint8`` array of shape ``(channels, size, size)``.

    Raises:
        ImageDecodeError: Empty, truncated, non-image, unsupported or oversized input.
    """
    if isinstance(data, (bytes, bytearray, memoryview)):
        if len(data) == 0:
            raise ImageDecodeError("empty image body", "empty")
        source: io.BytesIO | str = io.BytesIO(data)
    else:
        source = os.fspath(data)
        try:
            if os.path.getsize(source) == 0:
                raise ImageDecodeError("empty image file", "empty")
        except OSError as exc:
            raise ImageDecodeError(f"unreadable image file: {exc}", "unreadable") from exc
    mode = "RGB" if channels == 3 else "L"
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(source) as img:
                if img.format not in ALLOWED_FORMATS:
                    raise ImageDecodeError(f"unsupported image format {img.format!r}", "unsupported_format")
                width, height = img.size
                if width * height > max_pixels:
                    raise ImageDecodeError(
                        f"image of {width}x{height} pixels exceeds the limit of {max_pixels} pixels", "too_large"
                    )
                if width < 1 or height < 1:
                    raise ImageDecodeError(f"image has no pixels ({width}x{height})", "corrupt")
                if img.format == "JPEG":
                    # Shrink-on-load: the scale is picked so both sides stay >= the request,
                    # so the shorter side stays >= size (rotation by EXIF swaps the sides
                    # but not which one is shorter).
                    scale = size / min(width, height)
                    img.draft(mode, (max(1, math.ceil(width * scale)), max(1, math.ceil(height * scale))))
                img.load()
                orientation = img.getexif().get(EXIF_ORIENTATION, 1)
                upright = ImageOps.exif_transpose(img) if orientation not in (1, None) else img
                converted = upright.convert(mode)
    except ImageDecodeError:
        raise
    except (UnidentifiedImageError, Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise ImageDecodeError(f"not a decodable image: {exc}", "not_an_image") from exc
    except (OSError, SyntaxError, ValueError, TypeError, KeyError, IndexError) as exc:
        # Truncated or corrupt payloads, and malformed EXIF blocks.
        raise ImageDecodeError(f"corrupt or truncated image: {exc}", "corrupt") from exc
    return resize_center_crop(converted, size)


def resize_center_crop(img: Image.Image, size: int) -> np.ndarray:
    """Resize the shorter side to ``size`` and crop the centre square.

    Returns:
        ``uint8`` array ``(C, size, size)``.
    """
    width, height = img.size
    scale = size / min(width, height)
    new_w, new_h = max(size, round(width * scale)), max(size, round(height * scale))
    img = img.resize((new_w, new_h), Image.Resampling.BILINEAR)
    left, top = (new_w - size) // 2, (new_h - size) // 2
    img = img.crop((left, top, left + size, top + size))
    arr = np.asarray(img, dtype=np.uint8)
    arr = arr[None] if arr.ndim == 2 else arr.transpose(2, 0, 1)
    return np.ascontiguousarray(arr)
