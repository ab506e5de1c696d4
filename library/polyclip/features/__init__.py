"""Encoding images with frozen backbones, and the on-disk feature cache."""

from polyclip.features.cache import FeatureCache, encode_images, feature_key

__all__ = ["FeatureCache", "encode_images", "feature_key"]
