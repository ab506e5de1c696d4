"""Image encoders behind one interface, built by one factory."""

from polyclip.backbones.base import (
    Backbone,
    Preprocessing,
    images_to_unit,
    normalize_images,
    preprocess_images,
)
from polyclip.backbones.factory import (
    BackboneError,
    arch_spec,
    cache_identity,
    checkpoint_dir,
    create_backbone,
    has_trained_text_encoder,
    load_backbone,
    save_backbone,
    weights_path,
)

__all__ = [
    "Backbone",
    "BackboneError",
    "Preprocessing",
    "arch_spec",
    "cache_identity",
    "checkpoint_dir",
    "create_backbone",
    "has_trained_text_encoder",
    "images_to_unit",
    "load_backbone",
    "normalize_images",
    "preprocess_images",
    "save_backbone",
    "weights_path",
]
