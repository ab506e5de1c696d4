"""Evaluation metrics."""

from polyclip.metrics.classification import classification_metrics, topk_accuracy
from polyclip.metrics.zero_shot import choose_unseen, keep_seen, seen_mask, zero_shot_report

__all__ = ["choose_unseen", "classification_metrics", "keep_seen", "seen_mask", "topk_accuracy", "zero_shot_report"]
