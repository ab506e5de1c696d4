"""Evaluation metrics."""

from polyclip.metrics.classification import classification_metrics, topk_accuracy

__all__ = ["classification_metrics", "topk_accuracy"]
