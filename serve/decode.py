"""Decoding a request's image once, within a per-replica pixel budget.

The ingress decodes each request's image exactly once, at the smallest resolution that
still covers the largest member input (JPEG "draft" mode shrinks on load by 1/2, 1/4 or
1/8), applies its EXIF orientation, then resizes that one decode to every distinct
member input ``(size, channels)`` with :func:`polyclip.data.images.resize_center_crop`.

Bounds (a replica reserved half a CPU must not need gigabytes for a burst of small PNGs
that decompress to 36 Mpx each):

* ``max_pixels``: larger images are refused before their pixels are decompressed, with
  :class:`ImageTooLargeError` (the ingress maps the *type* to 413), and so are images
  PIL itself flags as decompression bombs;
* :class:`PixelBudget`: decoded pixels held at once by this replica; a decode waits for
  room (up to a deadline) instead of allocating;
* the ingress runs decodes on a fixed-size thread pool.
"""

from __future__ import annotations

import io
import struct
import threading
import time
import warnings
from collections.abc import Sequence

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from polyclip.data.images import ALLOWED_FORMATS, ImageDecodeError, resize_center_crop

#: Bytes one decoded pixel may take while converting (RGBA / 32-bit modes, plus a copy).
BYTES_PER_PIXEL = 8
#: Modes holding more than 8 bits per sample, scaled (not clipped) to 8 bits.
_WIDE_MODES = {"I;16": 257.0, "I;16L": 257.0, "I;16B": 257.0, "I;16N": 257.0, "I": 257.0, "F": 1.0}


class ImageTooLargeError(ImageDecodeError):
    """The image's pixel count exceeds the limit (the ingress answers 413)."""

    def __init__(self, message: str, width: int | None = None, height: int | None = None) -> None:
        super().__init__(message, "too_large")
        self.width = width
        self.height = height


class DecodeBusyError(RuntimeError):
    """The replica's pixel budget stayed full until the request's deadline (the ingress answers 503)."""


class PixelBudget:
    """A counting semaphore over decoded pixels, shared by one replica's decode threads.

    Args:
        capacity: Pixels that may be decoded at once (at least the largest single image).
    """

    def __init__(self, capacity: int) -> None:
        if capacity <= 0:
            raise ValueError(f"pixel budget must be positive, got {capacity}")
        self.capacity = capacity
        self.in_use = 0
        self.peak = 0
        self._cond = threading.Condition()

    def acquire(self, pixels: int, timeout_s: float) -> None:
        """Reserve ``pixels``, waiting up to ``timeout_s`` for others to release theirs.

        Raises:
            ImageTooLargeError: ``pixels`` exceeds the whole budget.
            DecodeBusyError: No room before the timeout.
        """
        if pixels > self.capacity:
            raise ImageTooLargeError(f"image of {pixels} decoded pixels exceeds this replica's decode budget of "
                                     f"{self.capacity} pixels")
        deadline = time.monotonic() + max(0.0, timeout_s)
        with self._cond:
            while self.in_use + pixels > self.capacity:
                left = deadline - time.monotonic()
                if left <= 0 or not self._cond.wait(left):
                    if self.in_use + pixels <= self.capacity:
                        break
                    raise DecodeBusyError(f"decode budget of {self.capacity} pixels is in use "
                                          f"({self.in_use}); retry later")
            self.in_use += pixels
            self.peak = max(self.peak, self.in_use)

    def release(self, pixels: int) -> None:
        with self._cond:
            self.in_use -= pixels
            self._cond.notify_all()


def _to_mode(img: Image.Image, mode: str) -> Image.Image:
    """``img.convert(mode)``, scaling 16-bit and float grayscale to 8 bits instead of clipping."""
    scale = _WIDE_MODES.get(img.mode)
    if scale is None:
        return img.convert(mode)
    gray = np.asarray(img, dtype=np.float32) / scale
    gray8 = Image.fromarray(np.clip(np.rint(gray), 0, 255).astype(np.uint8), mode="L")
    return gray8 if mode == "L" else gray8.convert(mode)


def decode_for_inputs(data: bytes, inputs: Sequence[tuple[int, int]], *, max_pixels: int,
                      budget: PixelBudget | None = None, budget_timeout_s: float = 10.0,
                      ) -> dict[tuple[int, int], np.ndarray]:
    """Decode ``data`` once and resize it to every ``(size, channels)`` in ``inputs``.

    Args:
        data: Encoded image bytes (JPEG, PNG, WebP, BMP, GIF, TIFF; first frame).
        inputs: Member inputs as ``(side, channels)``, channels 3 (RGB) or 1 (grayscale).
        max_pixels: Largest ``width * height`` accepted (checked from the header).
        budget: The replica's :class:`PixelBudget`, held while the pixels exist.
        budget_timeout_s: Longest wait for room in ``budget``.

    Returns:
        ``{(side, channels): uint8 array (channels, side, side)}``, one entry per distinct input.

    Raises:
        ImageTooLargeError: Above ``max_pixels`` or a PIL decompression bomb.
        ImageDecodeError: Empty, truncated, corrupt, non-image or unsupported input.
        DecodeBusyError: The budget stayed full.
    """
    if not data:
        raise ImageDecodeError("empty image body")
    keys = list(dict.fromkeys(inputs))
    largest = max(size for size, _ in keys)
    reserved = 0
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data)) as img:
                if img.format not in ALLOWED_FORMATS:
                    raise ImageDecodeError(f"unsupported image format {img.format!r}; accepted: "
                                           f"{sorted(ALLOWED_FORMATS)}")
                width, height = img.size
                if width < 1 or height < 1:
                    raise ImageDecodeError(f"image has no pixels ({width}x{height})")
                if width * height > max_pixels:
                    raise ImageTooLargeError(f"image of {width}x{height} pixels exceeds the limit of "
                                             f"{max_pixels} pixels", width, height)
                if img.format == "JPEG":  # shrink on load: DCT scaling keeps both sides >= the target
                    img.draft("L" if all(c == 1 for _, c in keys) else "RGB", (largest, largest))
                if budget is not None:
                    pixels = img.size[0] * img.size[1]
                    budget.acquire(pixels, budget_timeout_s)
                    reserved = pixels
                img.load()
                oriented = ImageOps.exif_transpose(img)
                converted = {c: _to_mode(oriented, "RGB" if c == 3 else "L") for c in {c for _, c in keys}}
                return {(size, c): resize_center_crop(converted[c], size) for size, c in keys}
    except (ImageDecodeError, DecodeBusyError):
        raise
    except Image.DecompressionBombError as exc:
        raise ImageTooLargeError(f"image exceeds the decompression limit: {exc}") from None
    except Image.DecompressionBombWarning as exc:
        raise ImageTooLargeError(f"image exceeds the decompression limit: {exc}") from None
    except UnidentifiedImageError as exc:
        raise ImageDecodeError(f"not a decodable image: {exc}") from None
    except (OSError, SyntaxError, ValueError, TypeError, IndexError, KeyError, EOFError, struct.error) as exc:
        # PIL raises many types for truncated or corrupt payloads and malformed EXIF.
        raise ImageDecodeError(f"corrupt or truncated image: {type(exc).__name__}: {exc}") from None
    finally:
        if budget is not None and reserved:
            budget.release(reserved)

