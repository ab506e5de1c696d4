"""Encoding images with frozen backbones, and the sharded feature store."""

from polyclip.features.cache import FeatureCache, encode_images, feature_key
from polyclip.features.store import FeatureSet, FeatureStore, ShardError, ShardWriter

__all__ = ["FeatureCache", "FeatureSet", "FeatureStore", "ShardError", "ShardWriter", "encode_images", "feature_key"]
