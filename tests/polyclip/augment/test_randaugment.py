"""FixMatch RandAugment against its references: op list, magnitudes, PIL's ops, Cutout size."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from PIL import Image, ImageEnhance, ImageOps

from polyclip.augment import Cutout, RandAugment, fixmatch_strong
from polyclip.augment.fixmatch import FIXMATCH_OPS


@pytest.fixture(autouse=True)
def _one_thread():
    """Small tensors: on a shared CPU, extra intra-op threads only contend."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)

# google-research/fixmatch RANDOM_POLICY_OPS / USB augment_list: 14 ops, Identity, no Invert.
REFERENCE_OPS = {
    "autocontrast", "brightness", "color", "contrast", "equalize", "identity", "posterize", "rotate", "sharpness",
    "shear_x", "shear_y", "solarize", "translate_x", "translate_y",
}


def test_op_list_and_ranges_match_the_references():
    names = [name for name, _, _ in FIXMATCH_OPS]
    assert len(names) == 14 and set(names) == REFERENCE_OPS and "invert" not in names
    ranges = {name: (lo, hi) for name, lo, hi in FIXMATCH_OPS}
    assert ranges["translate_x"] == ranges["translate_y"] == ranges["shear_x"] == ranges["shear_y"] == (-0.3, 0.3)
    assert ranges["rotate"] == (-30.0, 30.0)
    assert ranges["posterize"] == (4.0, 8.0) and ranges["solarize"] == (0.0, 256.0)
    for name in ("brightness", "color", "contrast", "sharpness"):
        assert ranges[name] == (0.05, 0.95)


def _pil_reference(pil: Image.Image, name: str, v: float) -> Image.Image:
    """USB's randaugment.py op ``name`` at value ``v``."""
    side = pil.size[0]
    ops = {
        "autocontrast": lambda: ImageOps.autocontrast(pil),
        "brightness": lambda: ImageEnhance.Brightness(pil).enhance(v),
        "color": lambda: ImageEnhance.Color(pil).enhance(v),
        "contrast": lambda: ImageEnhance.Contrast(pil).enhance(v),
        "equalize": lambda: ImageOps.equalize(pil),
        "identity": lambda: pil,
        "posterize": lambda: ImageOps.posterize(pil, int(v)),
        "rotate": lambda: pil.rotate(v),
        "sharpness": lambda: ImageEnhance.Sharpness(pil).enhance(v),
        "shear_x": lambda: pil.transform(pil.size, Image.AFFINE, (1, v, 0, 0, 1, 0)),
        "shear_y": lambda: pil.transform(pil.size, Image.AFFINE, (1, 0, 0, v, 1, 0)),
        "solarize": lambda: ImageOps.solarize(pil, v),
        "translate_x": lambda: pil.transform(pil.size, Image.AFFINE, (1, 0, v * side, 0, 1, 0)),
        "translate_y": lambda: pil.transform(pil.size, Image.AFFINE, (1, 0, 0, 0, 1, v * side)),
    }
    return ops[name]()


@pytest.mark.parametrize("channels", [1, 3])
@pytest.mark.parametrize(("name", "low", "high"), FIXMATCH_OPS)
def test_every_op_reproduces_pil(channels, name, low, high):
    """Each op at three values from its range equals PIL's on 8-bit levels (blends: within one level)."""
    rng = np.random.default_rng(0)
    levels = (rng.random((6, channels, 20, 20)) * 180 + 30).astype(np.uint8)
    levels[:, :, :4] //= 3  # a darker band, so autocontrast and equalize have work to do
    x = torch.tensor(levels, dtype=torch.float32) / 255
    augment = RandAugment()
    values = [low + (high - low) * u for u in (0.1, 0.5, 0.83)]
    for v in values:
        out = augment.apply_ops(x, torch.full((6,), augment.names.index(name)), torch.full((6,), v))
        ours = torch.round(out * 255).numpy()
        for i in range(6):
            img = levels[i].transpose(1, 2, 0)
            pil = Image.fromarray(img[..., 0] if channels == 1 else img)
            theirs = np.asarray(_pil_reference(pil, name, v), dtype=np.float32).reshape(20, 20, channels)
            diff = np.abs(ours[i].transpose(1, 2, 0) - theirs)
            assert diff.max() <= 1, (name, v, diff.max())


def test_ops_are_drawn_per_image_uniformly_with_replacement():
    torch.manual_seed(0)
    augment = RandAugment(n=2)
    kind, _ = augment.sample(14_000, torch.device("cpu"))
    counts = torch.bincount(kind.flatten(), minlength=14).double()
    expected = 28_000 / 14
    assert (counts - expected).abs().max() < 5 * math.sqrt(expected)
    repeated = (kind[:, 0] == kind[:, 1]).double().mean().item()
    assert abs(repeated - 1 / 14) < 0.01  # with replacement, as random.choices


def test_values_are_uniform_over_each_ops_range():
    torch.manual_seed(1)
    augment = RandAugment(n=2)
    kind, value = augment.sample(40_000, torch.device("cpu"))
    for index, (name, low, high) in enumerate(FIXMATCH_OPS):
        v = value[kind == index]
        assert v.min() >= low and v.max() <= high, name
        u = ((v - low) / (high - low)).sort().values
        # Kolmogorov-Smirnov distance to U[0, 1)
        ks = (u - torch.arange(1, len(u) + 1) / len(u)).abs().max().item()
        assert ks < 1.63 / math.sqrt(len(u)) + 0.01, name  # 1% level


def test_magnitude_varies_per_image_and_per_op():
    """Brightness on a constant image reveals each image's factor: spread over [0.05, 0.95].

    With two brightness ops the factors multiply; independent draws give a mean of
    0.5 ** 2 = 0.25, one shared draw per image would give E[f ** 2] = 0.3175.
    """
    torch.manual_seed(2)
    x = torch.full((4000, 1, 4, 4), 0.8)
    one = RandAugment(n=1, ops=(("brightness", 0.05, 0.95),))(x)
    factor = one[:, 0, 0, 0] / 0.8
    assert torch.all(one == one[:, :, :1, :1])  # one factor per image
    assert factor.min() < 0.07 and factor.max() > 0.93 and len(factor.unique()) > 3000
    two = RandAugment(n=2, ops=(("brightness", 0.05, 0.95),))(x)
    product = two[:, 0, 0, 0] / 0.8
    assert abs(product.mean().item() - 0.25) < 0.01


def test_translation_reaches_three_tenths_of_the_side():
    torch.manual_seed(3)
    x = torch.zeros(2000, 1, 20, 20)
    x[:, :, :, 10] = 1.0  # a vertical line; its column after translate_x gives the shift
    out = RandAugment(n=1, ops=(("translate_x", -0.3, 0.3),))(x)
    present = out[:, 0, 0].amax(dim=1) > 0
    cols = out[:, 0, 0].argmax(dim=1)[present] - 10
    assert cols.min() == -6 and cols.max() == 6  # |shift| <= 0.3 * 20 px, both ways
    assert present.all()


def test_rotation_by_ninety_degrees_is_rot90():
    x = torch.rand(2, 3, 8, 8)
    augment = RandAugment()
    out = augment.apply_ops(x, torch.full((2,), augment.names.index("rotate")), torch.full((2,), 90.0))
    torch.testing.assert_close(out, torch.rot90(x, 1, dims=(2, 3)))  # counter-clockwise, as PIL


def test_random_size_cutout_draws_a_side_up_to_half():
    torch.manual_seed(4)
    x = torch.rand(3000, 1, 32, 32) * 0.4
    out = Cutout(size=0.5, fill=1.0, random_size=True)(x)
    mask = out[:, 0] == 1.0
    rows, cols = mask.any(dim=2).sum(dim=1), mask.any(dim=1).sum(dim=1)
    # Unclipped squares (square and away from the borders) show the drawn side.
    centred = mask[:, 9:23, 9:23].any(dim=(1, 2)) & (rows == cols)
    sides = rows[centred]
    assert sides.max() == 16 and sides.min() <= 1
    assert 5 < sides.double().mean().item() < 11  # about uniform on 0..16
    assert len(sides.unique()) > 12


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_keeps_device_dtype_shape_and_range(dtype):
    torch.manual_seed(5)
    x = torch.rand(32, 3, 24, 24).to(dtype)
    out = RandAugment(n=2)(x)
    assert out.dtype == dtype and out.device == x.device and out.shape == x.shape
    assert out.min() >= 0 and out.max() <= 1
    strong = fixmatch_strong()(x)
    assert strong.dtype == dtype and strong.shape == x.shape


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_runs_on_the_gpu_without_host_synchronisation():
    x = torch.rand(256, 3, 32, 32, device="cuda")
    strong = fixmatch_strong()
    strong(x)  # warm-up
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        out = strong(x)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert out.device == x.device and out.dtype == x.dtype


def test_is_reproducible_under_a_seed_and_differs_per_image():
    x = torch.rand(1, 1, 28, 28).expand(64, 1, 28, 28)
    torch.manual_seed(6)
    a = RandAugment()(x)
    torch.manual_seed(6)
    assert torch.equal(a, RandAugment()(x))
    assert len({tuple(img.flatten().tolist()) for img in a}) > 40


@pytest.mark.parametrize(("kwargs", "match"), [
    ({"n": 0}, "n must be >= 1, got 0"),
    ({"ops": (("invert", 0.0, 1.0),)}, "unknown RandAugment ops \\['invert'\\]"),
])
def test_rejects_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        RandAugment(**kwargs)


def test_module_apply_still_visits_submodules():
    """``nn.Module.apply(fn)`` (weight init) must reach RandAugment like any module."""
    seen = []
    fixmatch_strong().apply(lambda m: seen.append(type(m).__name__))
    assert "RandAugment" in seen and "Cutout" in seen
