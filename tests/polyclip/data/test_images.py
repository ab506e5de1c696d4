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


def _quadrant_photo(width=400, height=300):
    """Upright test photo: red top-left quadrant, blue elsewhere, so orientation is visible."""
    arr = np.zeros((height, width, 3), np.uint8)
    arr[..., 2] = 200
    arr[: height // 2, : width // 2] = (220, 0, 0)
    return Image.fromarray(arr)


@pytest.mark.parametrize("orientation", [1, 3, 6, 8])
def test_exif_orientation_is_applied_before_resizing(orientation):
    from jobs.benchmarks.photo_folders import encode_jpeg

    data = encode_jpeg(_quadrant_photo(), orientation=orientation, quality=95)
    stored = Image.open(io.BytesIO(data))
    assert stored.size == ((300, 400) if orientation in (6, 8) else (400, 300))  # stored rotated
    out = decode_image(data, 32)  # centre square of the upright 4:3 photo
    red = out[0].astype(int) - out[2].astype(int) > 100
    # Upright, red is the top-left quadrant of the photo; the centre crop keeps its corner.
    assert red[:12, :6].all() and not red[20:, :].any() and not red[:, 20:].any()


def test_jpeg_is_shrunk_on_load_to_at_least_the_target_size(monkeypatch):
    from jobs.benchmarks.photo_folders import encode_jpeg

    photo = _quadrant_photo(2000, 1500)
    data = encode_jpeg(photo, quality=90)
    loaded_sizes = []
    real_resize = Image.Image.resize

    def spy(self, size, *args, **kwargs):
        loaded_sizes.append(self.size)
        return real_resize(self, size, *args, **kwargs)

    monkeypatch.setattr(Image.Image, "resize", spy)
    out = decode_image(data, 224)
    # 1/4 scale (500x375) keeps the short side >= 224; 1/8 (250x188) would not.
    assert loaded_sizes == [(500, 375)]
    monkeypatch.undo()
    full = real_resize(photo, (299, 224), Image.Resampling.BILINEAR).crop((37, 0, 261, 224))
    reference = np.asarray(full).transpose(2, 0, 1).astype(int)
    assert out.shape == (3, 224, 224)
    assert np.abs(out.astype(int) - reference).mean() < 4  # same picture as a full decode


def test_grayscale_draft_and_png_paths_give_the_same_shapes():
    from jobs.benchmarks.photo_folders import encode_jpeg

    data = encode_jpeg(_quadrant_photo(800, 600))
    assert decode_image(data, 64, channels=1).shape == (1, 64, 64)
    assert decode_image(_png((800, 600)), 64).shape == (3, 64, 64)


def test_decode_errors_carry_a_reason_that_survives_serialisation():
    import copy

    with pytest.raises(ImageDecodeError) as info:
        decode_image(b"", 8)
    assert info.value.reason == "empty"
    again = copy.deepcopy(info.value)  # goes through __reduce__, as Ray's serialiser does
    assert again.reason == "empty" and str(again) == "empty image body"
    with pytest.raises(ImageDecodeError) as info:
        decode_image(b"nope", 8)
    assert info.value.reason == "not_an_image"
    with pytest.raises(ImageDecodeError) as info:
        decode_image(_png()[:60], 8)
    assert info.value.reason == "corrupt"


def test_a_subclass_with_its_own_signature_still_copies():
    import copy

    class TooLargeError(ImageDecodeError):
        def __init__(self, message, width=None):
            super().__init__(message, "too_large")
            self.width = width

    again = copy.deepcopy(TooLargeError("big", width=9000))
    assert (again.width, again.reason, str(again)) == (9000, "too_large", "big")
