"""One bounded decode per request (serve.decode), on real encoded images, without Ray."""

import io
import threading

import numpy as np
import pytest
from PIL import Image

from polyclip.data.images import ImageDecodeError, decode_image
from serve.decode import DecodeBusyError, ImageTooLargeError, PixelBudget, decode_for_inputs


def _encode(image: Image.Image, fmt: str = "PNG", **kwargs) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **kwargs)
    return buffer.getvalue()


@pytest.fixture(scope="module")
def photo() -> Image.Image:
    """A smooth 300x200 RGB image (gradients), so resampling differences stay small."""
    y, x = np.mgrid[0:200, 0:300]
    rgb = np.stack([x * 255 // 299, y * 255 // 199, (x + y) * 255 // 498], axis=-1).astype(np.uint8)
    return Image.fromarray(rgb)


def test_one_decode_serves_every_member_input(photo):
    out = decode_for_inputs(_encode(photo), [(32, 3), (48, 3), (32, 3), (40, 1)], max_pixels=10**6)
    assert list(out) == [(32, 3), (48, 3), (40, 1)]
    assert out[(48, 3)].shape == (3, 48, 48) and out[(40, 1)].shape == (1, 40, 40)
    for size, channels in out:  # the same pixels as decoding once per input
        expected = decode_image(_encode(photo), size, channels=channels)
        assert np.abs(out[(size, channels)].astype(int) - expected).max() <= 1


def test_jpeg_is_shrunk_on_load_close_to_a_full_decode(photo):
    big = photo.resize((1600, 1200))
    data = _encode(big, "JPEG", quality=95)
    out = decode_for_inputs(data, [(64, 3)], max_pixels=10**7)[(64, 3)]
    full = decode_image(data, 64)
    assert np.abs(out.astype(int) - full).mean() < 3


def test_exif_orientation_is_applied(photo):
    rotated = photo.transpose(Image.Transpose.ROTATE_90)  # stored turned 90 degrees counter-clockwise ...
    exif = Image.Exif()
    exif[0x0112] = 6  # ... with orientation 6: "turn 90 degrees clockwise to display"
    out = decode_for_inputs(_encode(rotated, exif=exif), [(50, 3)], max_pixels=10**6)[(50, 3)]
    upright = decode_for_inputs(_encode(photo), [(50, 3)], max_pixels=10**6)[(50, 3)]
    assert np.abs(out.astype(int) - upright).max() <= 1


def test_cmyk_palette_and_16_bit_images_are_converted_not_clipped(photo):
    cmyk = decode_for_inputs(_encode(photo.convert("CMYK"), "JPEG"), [(32, 3)], max_pixels=10**6)[(32, 3)]
    assert cmyk.shape == (3, 32, 32) and cmyk.std() > 10
    palette = decode_for_inputs(_encode(photo.convert("P")), [(32, 3)], max_pixels=10**6)[(32, 3)]
    assert palette.std() > 10
    wide = np.linspace(0, 65535, 64 * 64).reshape(64, 64).astype(np.uint16)
    gray = decode_for_inputs(_encode(Image.fromarray(wide)), [(64, 1)], max_pixels=10**6)[(64, 1)][0]
    assert gray.min() == 0 and gray.max() == 255 and 100 < gray.mean() < 155  # scaled, not saturated at 255


@pytest.mark.parametrize("side", [1200, 7000, 10000, 20000])
def test_every_oversized_image_is_the_same_typed_error(side):
    bomb = _encode(Image.new("L", (side, side)))
    with pytest.raises(ImageTooLargeError) as err:
        decode_for_inputs(bomb, [(32, 3)], max_pixels=1_000_000)
    assert isinstance(err.value, ImageDecodeError)


@pytest.mark.parametrize("data", [b"", b"hello", b"\x89PNG\r\n\x1a\n" + b"\0" * 40, b"GIF89a\x01"])
def test_garbage_is_a_decode_error(data):
    with pytest.raises(ImageDecodeError):
        decode_for_inputs(data, [(32, 3)], max_pixels=10**6)


def test_truncated_png_is_a_decode_error(photo):
    data = _encode(photo)
    with pytest.raises(ImageDecodeError) as err:
        decode_for_inputs(data[: len(data) // 2], [(32, 3)], max_pixels=10**6)
    assert not isinstance(err.value, ImageTooLargeError)


def test_pixel_budget_waits_then_refuses_and_is_released(photo):
    budget = PixelBudget(100_000)
    data = _encode(photo)  # 60,000 pixels
    decode_for_inputs(data, [(32, 3)], max_pixels=10**6, budget=budget)
    assert budget.in_use == 0 and budget.peak == 60_000
    budget.acquire(50_000, 0)  # someone else holds half
    with pytest.raises(DecodeBusyError):
        decode_for_inputs(data, [(32, 3)], max_pixels=10**6, budget=budget, budget_timeout_s=0.05)
    assert budget.in_use == 50_000
    threading.Timer(0.05, budget.release, args=(50_000,)).start()  # room appears while waiting
    decode_for_inputs(data, [(32, 3)], max_pixels=10**6, budget=budget, budget_timeout_s=5)
    assert budget.in_use == 0
    with pytest.raises(ImageTooLargeError, match="decode budget"):
        decode_for_inputs(_encode(photo.resize((400, 300))), [(32, 3)], max_pixels=10**6, budget=budget)
    assert budget.in_use == 0
