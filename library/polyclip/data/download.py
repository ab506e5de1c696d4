"""Fetch a dataset's files for machines without the Debian package.

Usage::

    python -m polyclip.data.download fashion_mnist data/fashion-mnist

Fashion-MNIST comes from torchvision's mirrors (the same four ``*-ubyte.gz`` files the
Debian package ``dataset-fashion-mnist`` installs). This is never called implicitly:
a missing dataset is an error that names this command.
"""

from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path


def download_fashion_mnist(target: Path) -> Path:
    """Download Fashion-MNIST's gzip files into ``target``."""
    from torchvision.datasets import FashionMNIST

    staging = target / "_torchvision"
    FashionMNIST(str(staging), train=True, download=True)
    FashionMNIST(str(staging), train=False, download=True)
    raw = staging / "FashionMNIST" / "raw"
    for gz in raw.glob("*.gz"):
        shutil.copy2(gz, target / gz.name)
    shutil.rmtree(staging, ignore_errors=True)
    return target


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m polyclip.data.download")
    parser.add_argument("dataset", choices=["fashion_mnist"])
    parser.add_argument("target", type=Path)
    args = parser.parse_args(argv)
    args.target.mkdir(parents=True, exist_ok=True)
    print(download_fashion_mnist(args.target))


if __name__ == "__main__":
    main(sys.argv[1:])
