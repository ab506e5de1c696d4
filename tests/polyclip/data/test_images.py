import io

import numpy as np
import pytest
from PIL import Image

from polyclip.data.images import ImageDecodeError, decode_image


def _png(size=(40, 30), mode="RGB") -> bytes:
    buf = io.BytesIO()
    Image.new(mode, size, color=(200, 10, 10) if mode == "RGB" else 128).save(buf, format="PNG")
    return buf.getvalue()


def test_decode_resizes_and_crops_to_square():
    out = decode_image(_png((40, 30)), 16)
    assert out.shape == (3, 16, 16) and out.dtype == np.uint8
    assert out[0].mean() > 190 and out[1].mean() < 20  # red survives


def test_grayscale_becomes_rgb_or_stays_single_channel():
    assert decode_image(_png(mode="L"), 8).shape == (3, 8, 8)
    assert decode_image(_png(mode="L"), 8, channels=1).shape == (1, 8, 8)


@pytest.mark.parametrize(
    ("payload", "message"),
    [
        (b"", "empty"),
        (b"definitely not an image", "not a decodable image"),
        (_png()[:60], "corrupt or truncated"),
    ],
)
def test_bad_inputs_raise_clear_errors(payload, message):
    with pytest.raises(ImageDecodeError, match=message):
        decode_image(payload, 8)


def test_decompression_bomb_is_rejected_before_decoding():
    big = _png((3000, 3000))
    with pytest.raises(ImageDecodeError, match="exceeds the limit"):
        decode_image(big, 8, max_pixels=1_000_000)
