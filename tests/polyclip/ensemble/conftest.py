"""Synthetic feature arrays where each backbone is reliable on a different part of the data."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pytest


@dataclass
class DomainFeatures:
    """Features of ``n_backbones`` fake backbones for images drawn from as many domains.

    Backbone ``b`` sees the true class of images from domain ``b`` and a random class
    (confidently, same cluster geometry) for the others; every backbone's features also
    carry a domain direction. A single head is thus right on about one image in
    ``n_backbones``, logit averaging is confused by the confidently wrong members, and
    an adaptive combiner that reads the domain can pick the right backbone per image.
    """

    train: dict[str, np.ndarray]
    y_train: np.ndarray
    test: dict[str, np.ndarray]
    y_test: np.ndarray
    domain_test: np.ndarray
    class_names: list[str]


def make_domain_features(*, labels_per_class: int, n_test: int = 900, num_classes: int = 6, n_backbones: int = 3,
                         dims: tuple[int, ...] = (24, 32, 40), noise: float = 0.35, domain_strength: float = 2.0,
                         seed: int = 0) -> DomainFeatures:
    rng = np.random.default_rng(seed)
    means = [rng.normal(size=(num_classes, d)) for d in dims[:n_backbones]]
    domain_dirs = [rng.normal(size=(n_backbones, d)) for d in dims[:n_backbones]]

    def draw(labels: np.ndarray) -> tuple[dict[str, np.ndarray], np.ndarray]:
        domains = rng.integers(0, n_backbones, size=len(labels))
        out = {}
        for b in range(n_backbones):
            shown = np.where(domains == b, labels, rng.integers(0, num_classes, size=len(labels)))
            x = means[b][shown] + domain_strength * domain_dirs[b][domains]
            x += noise * rng.normal(size=x.shape)
            out[f"bb{b}"] = x.astype(np.float32)
        return out, domains

    y_train = np.repeat(np.arange(num_classes), labels_per_class)
    y_test = rng.integers(0, num_classes, size=n_test)
    train, _ = draw(y_train)
    test, domain_test = draw(y_test)
    return DomainFeatures(train, y_train, test, y_test, domain_test, [f"class{c}" for c in range(num_classes)])


@pytest.fixture()
def domain_features():
    """The :func:`make_domain_features` factory."""
    return make_domain_features


@pytest.fixture(autouse=True, scope="module")
def _one_torch_thread():
    """These tensors are tiny: on a shared 2-core machine, extra intra-op threads only contend."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
