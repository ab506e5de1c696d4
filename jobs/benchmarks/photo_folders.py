"""Generate folders of realistic photos for data-scale benchmarks and tests.

Each image is a random crop of one of scikit-image's bundled photos (they load offline),
with a random flip and brightness change, saved as a 500x375 JPEG like a phone-sized
web photo. About a quarter carry an EXIF orientation tag (3, 6 or 8) with their pixels
stored rotated, as cameras do, so a decoder that ignores EXIF gets them sideways.
``corrupt`` files are added on top: truncated JPEGs, text named ``.jpg`` and empty files.

Labeled folders are ``<root>/<class>/<file>.jpg`` with one class per source photo;
unlabeled folders are flat (``<root>/<file>.jpg``).

Example:
    python -m jobs.benchmarks.photo_folders runs/photos --n 2000 --corrupt 5
"""

from __future__ import annotations

import argparse
import io
import json
import os
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

#: Source photo per class (all bundled with scikit-image, no download).
PHOTOS = {
    "astronaut": "astronaut",
    "cat": "chelsea",
    "coffee": "coffee",
    "rocket": "rocket",
    "galaxy": "hubble_deep_field",
}
PHOTO_SIZE = (500, 375)
#: Where the benchmarks keep their generated folders.
PHOTO_ROOT = Path("runs/benchmarks/photos")
#: Bad files per benchmark folder (truncated, text, empty), reported and skipped by the jobs.
CORRUPT = 6
#: EXIF orientation -> the rotation that stores an upright image that way (PIL.Image.Transpose).
_STORE_ROTATED = {3: Image.Transpose.ROTATE_180, 6: Image.Transpose.ROTATE_90, 8: Image.Transpose.ROTATE_270}


@dataclass
class PhotoFolder:
    """What :func:`make_photo_folder` wrote.

    Attributes:
        root: The folder.
        images: Number of valid photos.
        corrupt: Paths of the deliberately bad files.
        rotated: Number of photos stored rotated with an EXIF orientation tag.
        classes: Class names (empty when unlabeled).
    """

    root: str
    images: int
    corrupt: list[str] = field(default_factory=list)
    rotated: int = 0
    classes: list[str] = field(default_factory=list)


def _source_photos(classes: list[str]) -> dict[str, Image.Image]:
    from skimage import data

    return {name: Image.fromarray(getattr(data, PHOTOS[name])()).convert("RGB") for name in classes}


def random_photo(source: Image.Image, rng: np.random.Generator, size: tuple[int, int] = PHOTO_SIZE) -> Image.Image:
    """A random 4:3 crop of ``source`` (40-100% of its extent), flipped and brightened at random."""
    width, height = source.size
    aspect = size[0] / size[1]
    crop_w = int(min(width, height * aspect) * rng.uniform(0.4, 1.0))
    crop_h = max(1, int(crop_w / aspect))
    left = int(rng.integers(0, width - crop_w + 1))
    top = int(rng.integers(0, height - crop_h + 1))
    photo = source.crop((left, top, left + crop_w, top + crop_h)).resize(size, Image.Resampling.BILINEAR)
    if rng.random() < 0.5:
        photo = photo.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    factor = rng.uniform(0.8, 1.2)
    return photo.point(lambda v: min(255, int(v * factor)))


def encode_jpeg(photo: Image.Image, *, orientation: int = 1, quality: int = 90) -> bytes:
    """JPEG bytes of an upright ``photo``; with ``orientation`` != 1 the pixels are stored
    rotated and tagged so that an EXIF-aware viewer shows ``photo`` upright."""
    buffer = io.BytesIO()
    if orientation == 1:
        photo.save(buffer, format="JPEG", quality=quality)
    else:
        exif = Image.Exif()
        exif[0x0112] = orientation
        photo.transpose(_STORE_ROTATED[orientation]).save(buffer, format="JPEG", quality=quality, exif=exif)
    return buffer.getvalue()


def _corrupt_payloads(valid: bytes) -> list[tuple[str, bytes]]:
    return [
        ("truncated", valid[: len(valid) // 3]),
        ("not_an_image", b"this is a text file, not a photo\n"),
        ("empty", b""),
    ]


def make_photo_folder(
    root: str | Path,
    n: int,
    *,
    labeled: bool = True,
    num_classes: int = 5,
    corrupt: int = 0,
    rotated_share: float = 0.25,
    seed: int = 0,
    quality: int = 90,
) -> PhotoFolder:
    """Write ``n`` photos (plus ``corrupt`` bad files) under ``root``.

    Args:
        root: Output folder (created).
        n: Valid photos to write, spread evenly over the classes.
        labeled: Class sub-folders if True, else one flat folder.
        num_classes: Classes (at most ``len(PHOTOS)``).
        corrupt: Bad files added, cycling through truncated, text and empty.
        rotated_share: Share of photos stored rotated with an EXIF orientation tag.
        seed: Random seed (same seed, same bytes).
        quality: JPEG quality.

    Returns:
        A :class:`PhotoFolder` summary (also written to ``<root>/photos.json``).
    """
    if not 1 <= num_classes <= len(PHOTOS):
        raise ValueError(f"num_classes must be 1..{len(PHOTOS)}, got {num_classes}")
    rng = np.random.default_rng(seed)
    classes = list(PHOTOS)[:num_classes]
    sources = _source_photos(classes)
    out = Path(root)
    folders = {name: (out / name if labeled else out) for name in classes}
    for folder in folders.values():
        folder.mkdir(parents=True, exist_ok=True)
    rotated = 0
    last = b""
    for i in range(n):
        name = classes[i % num_classes]
        orientation = int(rng.choice([3, 6, 8])) if rng.random() < rotated_share else 1
        rotated += orientation != 1
        last = encode_jpeg(random_photo(sources[name], rng), orientation=orientation, quality=quality)
        (folders[name] / f"{name}_{i:07d}.jpg").write_bytes(last)
    bad_paths = []
    payloads = _corrupt_payloads(last or encode_jpeg(random_photo(sources[classes[0]], rng)))
    for j in range(corrupt):
        kind, payload = payloads[j % len(payloads)]
        path = folders[classes[j % num_classes]] / f"bad_{kind}_{j:04d}.jpg"
        path.write_bytes(payload)
        bad_paths.append(str(path))
    summary = PhotoFolder(str(out), n, bad_paths, rotated, classes if labeled else [])
    (out / "photos.json").write_text(json.dumps(asdict(summary), indent=2) + "\n")
    return summary


def main(argv: list[str] | None = None) -> PhotoFolder:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("root")
    parser.add_argument("--n", type=int, default=2000)
    parser.add_argument("--unlabeled", action="store_true", help="one flat folder, no class sub-folders")
    parser.add_argument("--classes", type=int, default=5)
    parser.add_argument("--corrupt", type=int, default=0)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    summary = make_photo_folder(
        args.root, args.n, labeled=not args.unlabeled, num_classes=args.classes, corrupt=args.corrupt, seed=args.seed
    )
    print(json.dumps(asdict(summary) | {"corrupt": len(summary.corrupt)}))
    return summary



def sized_photo_folder(root: Path, n: int, largest: int) -> Path:
    """``root/photos_<n>``: ``n`` labeled photos (+ :data:`CORRUPT` bad files), generated or linked once.

    The benchmarks share these folders (``data_scale``, ``streaming_ingest``), so a pool
    size is generated once per machine.

    A folder of ``n`` photos is made of hard links to the first ``n`` photos of the
    smallest existing folder that has at least ``n`` (generated with the same seed, the
    first ``n`` photos are the same), else of a folder of ``largest`` generated now.
    """
    folder = root / f"photos_{n}"
    if (folder / "photos.json").exists():
        return folder
    existing = sorted(
        (int(p.parent.name.split("_")[1]), p.parent)
        for p in root.glob("photos_*/photos.json")
        if p.parent.name.split("_")[1].isdigit() and int(p.parent.name.split("_")[1]) >= n
    )
    if existing:
        full = existing[0][1]
    else:
        full = root / f"photos_{largest}"
        started = time.perf_counter()
        make_photo_folder(full, largest, corrupt=CORRUPT, seed=0)
        print(f"generated {largest} photos in {time.perf_counter() - started:.0f} s", file=sys.stderr)
    if full != folder:
        # The first n photos (names carry a global index), hard-linked.
        for src in sorted(full.rglob("*.jpg")):
            index = int(src.stem.rsplit("_", 1)[1])
            if src.name.startswith("bad_") or index < n:
                dst = folder / src.relative_to(full)
                dst.parent.mkdir(parents=True, exist_ok=True)
                if not dst.exists():
                    os.link(src, dst)
        (folder / "photos.json").write_text(json.dumps({"images": n, "linked_from": str(full)}) + "\n")
    return folder


if __name__ == "__main__":
    main()
