"""Label semantics for jobs: the similarity matrix from ``word_vectors:`` and the semantic metrics.

Both run on the driver: the matrix is computed once per job (the CES loss gets it in the
payload and keeps it on the training device as a buffer), the metrics once per run from
the final test logits.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np

from polyclip.metrics.semantic import semantic_similarity_report


def label_similarity(section: Any, class_names: Sequence[str]) -> np.ndarray:
    """``(C, C)`` cosine similarity of the labels' word vectors, per a job's ``word_vectors:`` section.

    Args:
        section: ``jobs.config.WordVectorsSection`` (``source``, ``head_word``, ``overrides``).
        class_names: The dataset's ``C`` class names.

    Returns:
        float32 ``(C, C)``, ones on the diagonal.

    Raises:
        polyclip.text.MissingLabelVectorsError: Naming every label without a vector.
        polyclip.text.WordVectorsError: ``word_vectors.source`` cannot be loaded.
    """
    from polyclip.text import label_similarity_matrix, label_vectors, load_word_vectors  # gensim: import on use

    kv = load_word_vectors(section.source)
    vectors = label_vectors(list(class_names), kv, head_word=section.head_word, overrides=section.overrides)
    return label_similarity_matrix(vectors).numpy()


def label_similarity_for(cfg: Any, class_names: Sequence[str], payload: Any) -> np.ndarray:
    """A job's label similarity: the one its recipe already computed (CES), else from ``cfg.word_vectors``."""
    similarity = getattr(payload.extras, "similarity", None)
    if similarity is not None:
        return np.asarray(similarity)
    return label_similarity(cfg.word_vectors, class_names)


def semantic_metrics(logits: np.ndarray, labels: np.ndarray, similarity: np.ndarray, *, k: int = 3,
                     source: str | None = None) -> dict[str, Any]:
    """The ``metrics["semantic"]`` entry of a run.

    Args:
        logits: ``(N, C)`` test scores.
        labels: ``(N,)`` true labels.
        similarity: ``(C, C)`` label similarity.
        k: Predictions per example for the top-``k`` similarity.
        source: The word-vector spec, recorded with the numbers.

    Returns:
        ``semantic_error_distance`` (mean ``1 - S[pred, true]`` over mistakes; None when
        there are none), ``top{k}_similarity``, ``top1_similarity``,
        ``control_similarity`` (random label pairs), ``ratio_to_control``,
        ``num_errors`` and ``word_vectors``.
    """
    report = semantic_similarity_report(logits, labels, similarity, k=k)
    out: dict[str, Any] = {"semantic_error_distance": report.pop("error_distance"), **report}
    out = {key: (None if isinstance(v, float) and math.isnan(v) else v) for key, v in out.items()}
    out["num_errors"] = int((np.asarray(logits).argmax(1) != np.asarray(labels)).sum())
    out["word_vectors"] = source
    return out


__all__ = ["label_similarity", "label_similarity_for", "semantic_metrics"]
