"""Decoding untrusted image bytes into fixed-size uint8 arrays.

Used by the image-folder dataset and by the Serve ingress: both must turn a corrupt,
truncated, non-image or oversized input into a clear :class:`ImageDecodeError` rather
than a crash.
"""

from __future__ import annotations

import io
import os
import warnings

import numpy as np
from PIL import Image, UnidentifiedImageError

#: Formats accepted from users (ImageFolder data and HTTP requests).
ALLOWED_FORMATS = frozenset({"JPEG", "PNG", "WEBP", "BMP", "GIF", "TIFF"})
#: Extensions scanned in an image folder.
IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff"})


class ImageDecodeError(ValueError):
    """An input could not be decoded into an image; the message says why."""


def decode_image(
    data: bytes | str | os.PathLike[str],
    size: int,
    *,
    channels: int = 3,
    max_pixels: int = 40_000_000,
) -> np.ndarray:
    """Decode an image and resize it to ``size`` x ``size`` (shorter side, centre crop).

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
    if isinstance(data, (bytes, bytearray)):
        if len(data) == 0:
            raise ImageDecodeError("empty image body")
        source: io.BytesIO | str = io.BytesIO(bytes(data))
    else:
        source = os.fspath(data)
        if os.path.getsize(source) == 0:
            raise ImageDecodeError("empty image file")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(source) as img:
                if img.format not in ALLOWED_FORMATS:
                    raise ImageDecodeError(f"unsupported image format {img.format!r}")
                width, height = img.size
                if width * height > max_pixels:
                    raise ImageDecodeError(
                        f"image of {width}x{height} pixels exceeds the limit of {max_pixels} pixels"
                    )
                if width < 1 or height < 1:
                    raise ImageDecodeError(f"image has no pixels ({width}x{height})")
                img.load()
                converted = img.convert("RGB" if channels == 3 else "L")
    except ImageDecodeError:
        raise
    except (UnidentifiedImageError, Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise ImageDecodeError(f"not a decodable image: {exc}") from exc
    except (OSError, SyntaxError, ValueError) as exc:  # truncated or corrupt payloads
        raise ImageDecodeError(f"corrupt or truncated image: {exc}") from exc
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
    if arr.ndim == 2:
        arr = arr[None]
    else:
        arr = arr.transpose(2, 0, 1)
    return np.ascontiguousarray(arr)
