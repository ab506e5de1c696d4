"""The language layer: word vectors, label vectors, look-up and CLIP zero-shot heads.

The word-vector names load on first use, so that ``polyclip.text.clip_zeroshot`` (and the
label-vector helpers) work on a core install without the ``[language]`` extra: only
word vectors need gensim.
"""

from __future__ import annotations

import importlib
from typing import Any

from polyclip.text.label_vectors import (
    MissingLabelVectorsError,
    label_alternatives,
    label_similarity_matrix,
    label_vectors,
    resolve_label,
    resolve_labels,
    sentence_label_vectors,
)

_WORD_VECTOR_NAMES = ("DEFAULT_WORD_VECTORS", "WordVectorsError", "keyed_vectors", "load_word_vectors")

__all__ = [
    "DEFAULT_WORD_VECTORS",
    "MissingLabelVectorsError",
    "WordVectorsError",
    "keyed_vectors",
    "label_alternatives",
    "label_similarity_matrix",
    "label_vectors",
    "load_word_vectors",
    "resolve_label",
    "resolve_labels",
    "sentence_label_vectors",
]


def __getattr__(name: str) -> Any:
    if name in _WORD_VECTOR_NAMES:
        return getattr(importlib.import_module("polyclip.text.word_vectors"), name)
    raise AttributeError(f"module 'polyclip.text' has no attribute {name!r}")
