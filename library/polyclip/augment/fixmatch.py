"""Weak and strong augmentations for FixMatch-style consistency training.

FixMatch (Sohn et al., 2020) predicts a pseudo-label on a *weakly* augmented image (flip
and a small translation) and trains on a *strongly* augmented view of the same image
(RandAugment with a random magnitude per op and image, followed by Cutout of a random
size), as in google-research/fixmatch and USB. Both act on [0, 1] batches on the training device;
normalisation comes afterwards, in the backbone.
"""

from __future__ import annotations

import kornia.augmentation as K
import torch
import torch.nn.functional as F
from torch import nn


class RandomReflectTranslate(nn.Module):
    """Translate each image by a random whole number of pixels, filling with reflections.

    FixMatch's weak translation: reflect-pad by ``max_shift`` of each side, then take a
    random crop of the original size. The content is exactly the input shifted by
    ``(dy, dx)`` with ``|dy| <= round(max_shift * H)`` and ``|dx| <= round(max_shift * W)``,
    drawn uniformly per image; no resampling.

    Args:
        max_shift: Largest shift as a fraction of the side (FixMatch: 0.125, 4 px at 32 px).

    Shapes:
        ``(B, C, H, W)`` -> same shape. The padding must be smaller than the side, so
        ``max_shift < 1``.

    Example:
        >>> shift = RandomReflectTranslate(0.125)
        >>> shift(torch.rand(8, 3, 32, 32)).shape
        torch.Size([8, 3, 32, 32])
    """

    def __init__(self, max_shift: float = 0.125) -> None:
        super().__init__()
        if not 0.0 <= max_shift < 1.0:
            raise ValueError(f"max_shift must be in [0, 1), got {max_shift}")
        self.max_shift = max_shift

    def padding(self, height: int, width: int) -> tuple[int, int]:
        """The reflect padding ``(pad_h, pad_w)``, i.e. the largest shift, in pixels."""
        return round(self.max_shift * height), round(self.max_shift * width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, C, H, W = x.shape
        ph, pw = self.padding(H, W)
        if ph == 0 and pw == 0:
            return x
        padded = F.pad(x, (pw, pw, ph, ph), mode="reflect")
        top = torch.randint(2 * ph + 1, (B,), device=x.device)
        left = torch.randint(2 * pw + 1, (B,), device=x.device)
        rows = top[:, None] + torch.arange(H, device=x.device)
        cols = left[:, None] + torch.arange(W, device=x.device)
        out = padded.gather(2, rows[:, None, :, None].expand(B, C, H, W + 2 * pw))
        return out.gather(3, cols[:, None, None, :].expand(B, C, H, W))


class Cutout(nn.Module):
    """Fill a random square of each image with a constant (DeVries & Taylor, 2017).

    The square's side is ``round(size * min(H, W))`` pixels, or, with ``random_size``,
    ``round(u * size * min(H, W))`` with ``u ~ U[0, 1)`` drawn per image (FixMatch's
    RandAugment and USB: a side of up to half the image). Its centre is uniform over the
    image, so near a border the square is clipped, as in the original Cutout and in
    FixMatch's ``CutoutAbs``.

    Args:
        size: Side of the square as a fraction of the image side (FixMatch: 0.5), the
            largest side with ``random_size``.
        fill: Value written into the square (0.5, the grey FixMatch uses; 0 for black).
        p: Probability that an image is cut out.
        random_size: Draw the side per image, uniformly up to ``size``.

    Shapes:
        ``(B, C, H, W)`` -> same shape; all channels are cut at the same place.

    Example:
        >>> cutout = Cutout(size=0.5)
        >>> cutout(torch.rand(8, 3, 32, 32)).shape
        torch.Size([8, 3, 32, 32])
    """

    def __init__(self, size: float = 0.5, fill: float = 0.5, p: float = 1.0, random_size: bool = False) -> None:
        super().__init__()
        if not 0.0 <= size <= 1.0:
            raise ValueError(f"size must be in [0, 1], got {size}")
        if not 0.0 <= p <= 1.0:
            raise ValueError(f"p must be in [0, 1], got {p}")
        self.size = size
        self.fill = fill
        self.p = p
        self.random_size = random_size

    def side(self, height: int, width: int) -> int:
        """The square's (largest, with ``random_size``) side in pixels for an image of ``height x width``."""
        return round(self.size * min(height, width))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, _, H, W = x.shape
        if self.random_size:
            s = torch.round(torch.rand(B, device=x.device) * (self.size * min(H, W))).long()
        else:
            s = torch.full((B,), self.side(H, W), device=x.device, dtype=torch.long)
        applied = torch.rand(B, device=x.device) < self.p
        cy = torch.randint(H, (B,), device=x.device)
        cx = torch.randint(W, (B,), device=x.device)
        y0, x0 = cy - s // 2, cx - s // 2
        ys = torch.arange(H, device=x.device)[None, :]
        xs = torch.arange(W, device=x.device)[None, :]
        in_rows = (ys >= y0[:, None]) & (ys < (y0 + s)[:, None])
        in_cols = (xs >= x0[:, None]) & (xs < (x0 + s)[:, None])
        mask = in_rows[:, :, None] & in_cols[:, None, :] & applied[:, None, None]
        return x.masked_fill(mask[:, None], self.fill)


# FixMatch's RandAugment pool (Sohn et al. 2020, table 12; USB ``fixmatch_augment_pool``):
# each op's value is ``low + (high - low) * u`` with ``u ~ U[0, 1)`` drawn per op and per
# image. Enhancement factors follow PIL (1 = identity, 0 = the degenerate image);
# translations are fractions of the side; solarize thresholds are in 0-255 levels.
FIXMATCH_OPS: tuple[tuple[str, float, float], ...] = (
    ("autocontrast", 0.0, 1.0),
    ("brightness", 0.05, 0.95),
    ("color", 0.05, 0.95),
    ("contrast", 0.05, 0.95),
    ("equalize", 0.0, 1.0),
    ("identity", 0.0, 1.0),
    ("posterize", 4.0, 8.0),
    ("rotate", -30.0, 30.0),
    ("sharpness", 0.05, 0.95),
    ("shear_x", -0.3, 0.3),
    ("shear_y", -0.3, 0.3),
    ("solarize", 0.0, 256.0),
    ("translate_x", -0.3, 0.3),
    ("translate_y", -0.3, 0.3),
)
_GEOMETRIC = ("rotate", "shear_x", "shear_y", "translate_x", "translate_y")
_BLENDS = ("brightness", "color", "contrast", "sharpness")
# The outputs one step computes for the whole batch; each image then keeps one of them.
_FAMILIES = ("identity", "geometric", "blend", "autocontrast", "equalize", "posterize", "solarize")
# PIL's ImageFilter.SMOOTH, the degenerate image of ImageEnhance.Sharpness.
_SMOOTH = torch.tensor([[1.0, 1.0, 1.0], [1.0, 5.0, 1.0], [1.0, 1.0, 1.0]]) / 13.0


def grayscale(x: torch.Tensor) -> torch.Tensor:
    """PIL's ``L`` conversion (ITU-R 601-2 luma) of ``(B, C, H, W)``; 1-channel input is returned as is."""
    if x.shape[1] == 1:
        return x
    weights = torch.tensor([0.299, 0.587, 0.114], device=x.device, dtype=x.dtype)
    return (x * weights[:, None, None]).sum(dim=1, keepdim=True)


def _to_levels(x: torch.Tensor) -> torch.Tensor:
    """[0, 1] floats to the integer 0-255 levels PIL works on (as floats)."""
    return torch.round(x.clamp(0.0, 1.0) * 255.0)


def autocontrast(x: torch.Tensor) -> torch.Tensor:
    """``ImageOps.autocontrast``: stretch each channel of each image to span [0, 1]."""
    lo = x.amin(dim=(2, 3), keepdim=True)
    hi = x.amax(dim=(2, 3), keepdim=True)
    span = hi - lo
    return torch.where(span > 0, (x - lo) / span.clamp_min(1e-12), x)


def equalize(x: torch.Tensor) -> torch.Tensor:
    """``ImageOps.equalize``: per-channel histogram equalisation on 256 levels, batched.

    PIL's rule: ``step = (N - count of the last non-empty level) // 255`` and
    ``lut[i] = (step // 2 + #pixels below level i) // step``; a channel with ``step = 0``
    (e.g. a single level) is left unchanged.
    """
    B, C, H, W = x.shape
    levels = _to_levels(x).long().view(B * C, H * W)
    hist = torch.zeros(B * C, 256, device=x.device, dtype=torch.long).scatter_add_(1, levels,
                                                                                  torch.ones_like(levels))
    index = torch.arange(256, device=x.device)
    last = torch.where(hist > 0, index, -1).amax(dim=1, keepdim=True)
    step = (H * W - hist.gather(1, last)) // 255
    below = hist.cumsum(dim=1) - hist
    lut = ((step // 2 + below) // step.clamp_min(1)).clamp(max=255)
    lut = torch.where(step > 0, lut, index)
    return (lut.gather(1, levels).to(x.dtype) / 255.0).view(B, C, H, W)


def posterize(x: torch.Tensor, bits: torch.Tensor) -> torch.Tensor:
    """``ImageOps.posterize``: keep the top ``bits`` (per image, 1-8) of each 8-bit level."""
    unit = torch.pow(2.0, 8.0 - bits.to(x.dtype))[:, None, None, None]
    return torch.floor(_to_levels(x) / unit) * unit / 255.0


def solarize(x: torch.Tensor, threshold: torch.Tensor) -> torch.Tensor:
    """``ImageOps.solarize``: invert every level at or above ``threshold`` (per image, 0-256 levels)."""
    return torch.where(_to_levels(x) >= threshold[:, None, None, None], 1.0 - x, x)


def _smooth(x: torch.Tensor) -> torch.Tensor:
    """PIL's SMOOTH filter, leaving the one-pixel border unchanged as PIL does."""
    C = x.shape[1]
    kernel = _SMOOTH.to(device=x.device, dtype=x.dtype).expand(C, 1, 3, 3)
    inner = F.conv2d(x, kernel, groups=C)
    return F.pad(inner, (1, 1, 1, 1)) + (x - F.pad(x[:, :, 1:-1, 1:-1], (1, 1, 1, 1)))


def _affine_sample(x: torch.Tensor, kind: torch.Tensor, value: torch.Tensor, names: tuple[str, ...]) -> torch.Tensor:
    """PIL's ``rotate`` / ``transform(AFFINE)`` with nearest sampling, one op per image.

    Output pixel ``(i, j)`` takes input pixel ``floor(A (j + 0.5, i + 0.5) + t)``, or 0
    outside the image, exactly as PIL's nearest-neighbour affine transform (in its 16.16
    fixed point): translations
    and shears use PIL's ``(1, v, 0, 0, 1, 0)``-style matrices (shears about the top-left
    corner), rotation is counter-clockwise about the centre as ``Image.rotate``.
    """
    B, C, H, W = x.shape
    one, zero = torch.ones_like(value), torch.zeros_like(value)

    def where(name: str, on: torch.Tensor, off: torch.Tensor) -> torch.Tensor:
        return torch.where(kind == names.index(name), on, off) if name in names else off

    theta = torch.deg2rad(value)
    cos, sin = torch.cos(theta), torch.sin(theta)
    cx, cy = W / 2.0, H / 2.0
    a = where("rotate", cos, one)
    b = where("rotate", -sin, where("shear_x", value, zero))
    c = where("rotate", cx - cos * cx + sin * cy, where("translate_x", value * W, zero))
    d = where("rotate", sin, where("shear_y", value, zero))
    e = where("rotate", cos, one)
    f = where("rotate", cy - sin * cx - cos * cy, where("translate_y", value * H, zero))
    # PIL's affine_fixed: 16.16 fixed-point coefficients, the +0.5 pixel centre folded
    # into the offset, and an arithmetic shift (floor); matching it keeps ties identical.
    def fix(v: torch.Tensor) -> torch.Tensor:
        return torch.floor(v * 65536.0 + 0.5).long()[:, None, None]

    ys = torch.arange(H, device=x.device)[None, :, None]
    xs = torch.arange(W, device=x.device)[None, None, :]
    col = (fix(c + 0.5 * a + 0.5 * b) + fix(a) * xs + fix(b) * ys) >> 16
    row = (fix(f + 0.5 * d + 0.5 * e) + fix(d) * xs + fix(e) * ys) >> 16
    inside = (col >= 0) & (col < W) & (row >= 0) & (row < H)
    index = (row.clamp(0, H - 1) * W + col.clamp(0, W - 1)).view(B, 1, H * W).expand(B, C, H * W)
    out = x.reshape(B, C, H * W).gather(2, index).view(B, C, H, W)
    return out * inside[:, None].to(x.dtype)


class RandAugment(nn.Module):
    """FixMatch's RandAugment: ``n`` random ops per image, each at a random magnitude.

    As in the references (google-research/fixmatch ``RANDOM_POLICY_OPS``, USB
    ``randaugment.py``): each image draws ``n`` ops from the 14 of :data:`FIXMATCH_OPS`
    (Identity included, no Invert) uniformly with replacement, and each op draws its value
    uniformly from its range, per image (rotation up to 30 degrees, shears and
    translations up to 0.3, enhancement factors in [0.05, 0.95], solarize threshold in
    [0, 256], posterize to 4-8 bits). The ops reproduce PIL's on 8-bit levels; geometric
    ops sample the nearest pixel and fill with 0, as PIL's defaults.

    The whole batch runs on its device without host synchronisation: every step computes
    the few op families (one affine resampling for all geometric ops, one blend for the
    four enhancements, autocontrast, equalize, posterize, solarize) for the whole batch
    and each image keeps the one its op belongs to.

    Args:
        n: Ops per image (FixMatch: 2).
        ops: ``(name, low, high)`` triples, a subset of :data:`FIXMATCH_OPS`' names.

    Shapes:
        ``(B, C, H, W)`` float in [0, 1] -> same shape, dtype and device, in [0, 1].

    Example:
        >>> augment = RandAugment(n=2)
        >>> augment(torch.rand(8, 1, 28, 28)).shape
        torch.Size([8, 1, 28, 28])
    """

    family: torch.Tensor
    low: torch.Tensor
    high: torch.Tensor

    def __init__(self, n: int = 2, ops: tuple[tuple[str, float, float], ...] = FIXMATCH_OPS) -> None:
        super().__init__()
        known = {name for name, _, _ in FIXMATCH_OPS}
        unknown = [name for name, _, _ in ops if name not in known]
        if unknown or not ops:
            raise ValueError(f"unknown RandAugment ops {unknown or ops}; valid: {sorted(known)}")
        if n < 1:
            raise ValueError(f"n must be >= 1, got {n}")
        self.n = n
        self.ops = tuple(ops)
        self.names = tuple(name for name, _, _ in ops)
        family = [_FAMILIES.index("geometric" if name in _GEOMETRIC else "blend" if name in _BLENDS else name)
                  for name in self.names]
        self.register_buffer("family", torch.tensor(family), persistent=False)
        self.register_buffer("low", torch.tensor([lo for _, lo, _ in ops]), persistent=False)
        self.register_buffer("high", torch.tensor([hi for _, _, hi in ops]), persistent=False)

    def sample(self, batch: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """Draw ``(op index, value)`` per image and step: two ``(batch, n)`` tensors."""
        kind = torch.randint(len(self.ops), (batch, self.n), device=device)
        low, high = self.low.to(device)[kind], self.high.to(device)[kind]
        return kind, low + (high - low) * torch.rand(batch, self.n, device=device)

    def apply_ops(self, x: torch.Tensor, kind: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
        """Apply op ``kind[i]`` at ``value[i]`` to image ``i``: one step, ``(B,)`` each."""
        B = x.shape[0]
        family = self.family.to(x.device)[kind]
        value = value.to(x.dtype)

        def is_op(name: str) -> torch.Tensor:
            return (kind == self.names.index(name)) if name in self.names else torch.zeros_like(kind, dtype=torch.bool)

        outputs = [x]
        # Float64 coordinates: PIL computes them in double, and float32 moves ties.
        outputs.append(_affine_sample(x, kind, value.double(), self.names)
                       if any(name in self.names for name in _GEOMETRIC) else x)
        # ImageEnhance: blend towards a degenerate image, out = degenerate + factor * (x - degenerate).
        gray = grayscale(x)
        degenerate = torch.zeros_like(x)
        degenerate = torch.where(is_op("color")[:, None, None, None], gray.expand_as(x), degenerate)
        degenerate = torch.where(is_op("contrast")[:, None, None, None],
                                 gray.mean(dim=(1, 2, 3), keepdim=True).expand_as(x), degenerate)
        degenerate = torch.where(is_op("sharpness")[:, None, None, None], _smooth(x), degenerate)
        factor = value[:, None, None, None]
        outputs.append((degenerate + factor * (x - degenerate)).clamp(0.0, 1.0))
        outputs.append(autocontrast(x))
        outputs.append(equalize(x))
        outputs.append(posterize(x, torch.floor(value).clamp(1, 8)))
        outputs.append(solarize(x, value))
        stacked = torch.stack(outputs)  # (families, B, C, H, W)
        return stacked[family, torch.arange(B, device=x.device)]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.ndim != 4:
            raise ValueError(f"expected a (B, C, H, W) batch, got shape {tuple(x.shape)}")
        kind, value = self.sample(x.shape[0], x.device)
        for step in range(self.n):
            x = self.apply_ops(x, kind[:, step], value[:, step])
        return x.clamp(0.0, 1.0)


def fixmatch_weak(flip_p: float = 0.5, max_shift: float = 0.125) -> nn.Sequential:
    """FixMatch's weak augmentation: horizontal flip, then a reflect-padded random translation.

    Args:
        flip_p: Probability of a horizontal flip.
        max_shift: Largest translation as a fraction of the side.

    Returns:
        ``nn.Sequential`` mapping ``(B, C, H, W)`` float in [0, 1] to the same shape
        (not normalised: apply ``backbone.normalize`` after it).

    Example:
        >>> weak = fixmatch_weak()
        >>> weak(torch.rand(4, 3, 32, 32)).shape
        torch.Size([4, 3, 32, 32])
    """
    return nn.Sequential(K.RandomHorizontalFlip(p=flip_p), RandomReflectTranslate(max_shift))


def fixmatch_strong(
    randaugment_n: int = 2,
    randaugment_m: int | None = None,
    cutout: float = 0.5,
    cutout_fill: float = 0.5,
    flip_p: float = 0.5,
    max_shift: float = 0.125,
) -> nn.Sequential:
    """FixMatch's strong augmentation: flip and translate, RandAugment, then Cutout.

    The reference implementations apply the weak flip and translation before RandAugment
    in the strong branch as well; pass ``flip_p=0, max_shift=0`` for RandAugment and
    Cutout alone. RandAugment draws every op's magnitude per image (see
    :class:`RandAugment`) and Cutout's side is drawn per image up to ``cutout``, as
    in google-research/fixmatch and USB. The arguments are named as the ``semi`` method's
    config keys.

    Args:
        randaugment_n: RandAugment operations per image.
        randaugment_m: Unused: the references draw the magnitude per op and image (USB
            keeps the argument as "deprecated" too); accepted so that existing configs
            still build.
        cutout: Largest side of the Cutout square as a fraction of the image side.
        cutout_fill: Value written into the Cutout square.
        flip_p: Probability of a horizontal flip before RandAugment.
        max_shift: Largest translation before RandAugment, as a fraction of the side.

    Returns:
        ``nn.Sequential`` mapping ``(B, C, H, W)`` float in [0, 1] to the same shape
        (not normalised: apply ``backbone.normalize`` after it).

    Example:
        >>> strong = fixmatch_strong()
        >>> strong(torch.rand(4, 3, 32, 32)).shape
        torch.Size([4, 3, 32, 32])
    """
    del randaugment_m
    return nn.Sequential(
        K.RandomHorizontalFlip(p=flip_p),
        RandomReflectTranslate(max_shift),
        RandAugment(n=randaugment_n),
        Cutout(size=cutout, fill=cutout_fill, random_size=True),
    )
