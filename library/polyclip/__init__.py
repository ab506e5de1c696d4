"""polyclip: few-label image classification that borrows from language and pretrained models.

The library imports without Ray: data, backbones, losses, methods, metrics, the ensemble
and reports live here; Ray entrypoints live in ``jobs/`` and ``serve/``.

The short path (see :mod:`polyclip.api`)::

    import polyclip

    probe = polyclip.few_shot_probe(images, labels, backbone="efficientnet_lite:0")
    predicted = probe.predict(new_images)
    features = polyclip.encode(images, backbone="efficientnet_lite:0")
    logits = polyclip.zero_shot(images, ["shirt", "shoe"], backbone="open_clip:ViT-B-32/openai")
    ensemble = polyclip.load_ensemble("runs/ensemble-demo/ensemble")

``import polyclip`` itself loads nothing heavy: these names import torch on first use.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

#: Public name -> the module that defines it (imported on first access).
_LAZY = {
    "Backbone": "polyclip.backbones.base",
    "BackboneError": "polyclip.backbones.factory",
    "create_backbone": "polyclip.backbones.factory",
    "load_dataset": "polyclip.data.datasets",
    "Probe": "polyclip.api",
    "encode": "polyclip.api",
    "few_shot_probe": "polyclip.api",
    "probe": "polyclip.api",
    "zero_shot": "polyclip.api",
    "load_ensemble": "polyclip.api",
    "build_loggers": "polyclip.tracking",
}

if TYPE_CHECKING:
    from polyclip.api import Probe, encode, few_shot_probe, load_ensemble, probe, zero_shot
    from polyclip.backbones.base import Backbone
    from polyclip.backbones.factory import BackboneError, create_backbone
    from polyclip.data.datasets import load_dataset
    from polyclip.tracking import build_loggers


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'polyclip' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # later look-ups skip this function
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *_LAZY])


__all__ = [
    "Backbone",
    "BackboneError",
    "Probe",
    "__version__",
    "build_loggers",
    "create_backbone",
    "encode",
    "few_shot_probe",
    "load_dataset",
    "load_ensemble",
    "probe",
    "zero_shot",
]
