"""Classification metrics written into every run's ``metrics.json``."""

from __future__ import annotations

import numpy as np
from sklearn.metrics import classification_report, confusion_matrix, f1_score


def topk_accuracy(logits: np.ndarray, labels: np.ndarray, k: int) -> float:
    """Share of rows whose true label is among the ``k`` highest scores."""
    k = min(k, logits.shape[1])
    topk = np.argpartition(-logits, kth=k - 1, axis=1)[:, :k]
    return float((topk == labels[:, None]).any(axis=1).mean())


def classification_metrics(logits: np.ndarray, labels: np.ndarray, class_names: list[str],
                           train_labels: np.ndarray | None = None) -> dict[str, object]:
    """Top-1, top-5, per-class accuracy, macro-F1, the sklearn report, the confusion matrix.

    Args:
        logits: ``(N, C)`` scores (logits or probabilities).
        labels: ``(N,)`` true labels.
        class_names: ``C`` names.
        train_labels: Labels the model was trained on, for the label counts.

    Returns:
        A JSON-serialisable dict.
    """
    num_classes = len(class_names)
    pred = logits.argmax(axis=1)
    cm = confusion_matrix(labels, pred, labels=np.arange(num_classes))
    support = cm.sum(axis=1)
    per_class = np.divide(np.diag(cm), support, out=np.zeros(num_classes), where=support > 0)
    report_kwargs = dict(labels=np.arange(num_classes), target_names=class_names, zero_division=0)
    out: dict[str, object] = {
        "n": len(labels),
        "top1": float((pred == labels).mean()),
        "top5": topk_accuracy(logits, labels, 5),
        "macro_f1": float(f1_score(labels, pred, labels=np.arange(num_classes), average="macro", zero_division=0)),
        "per_class_accuracy": {name: float(a) for name, a in zip(class_names, per_class)},
        "classification_report": classification_report(labels, pred, output_dict=True, **report_kwargs),
        "classification_report_text": classification_report(labels, pred, digits=4, **report_kwargs),
        "confusion_matrix": cm.tolist(),
        "test_label_counts": {name: int(n) for name, n in zip(class_names, support)},
    }
    if train_labels is not None:
        counts = np.bincount(train_labels, minlength=num_classes)
        out["train_label_counts"] = {name: int(n) for name, n in zip(class_names, counts)}
    return out
