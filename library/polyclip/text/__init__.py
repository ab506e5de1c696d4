"""The language layer: word vectors, label vectors, look-up and CLIP zero-shot heads.

Names load on first use, so that ``polyclip.text.clip_zeroshot`` works on a core install
without the ``[language]`` extra (gensim is needed only by the word-vector names).
"""

from __future__ import annotations

import importlib
from typing import Any

_NAMES = {
    "MissingLabelVectorsError": "polyclip.text.label_vectors",
    "label_alternatives": "polyclip.text.label_vectors",
    "label_similarity_matrix": "polyclip.text.label_vectors",
    "label_vectors": "polyclip.text.label_vectors",
    "resolve_label": "polyclip.text.label_vectors",
    "resolve_labels": "polyclip.text.label_vectors",
    "sentence_label_vectors": "polyclip.text.label_vectors",
    "DEFAULT_WORD_VECTORS": "polyclip.text.word_vectors",
    "WordVectorsError": "polyclip.text.word_vectors",
    "keyed_vectors": "polyclip.text.word_vectors",
    "load_word_vectors": "polyclip.text.word_vectors",
}

__all__ = sorted(_NAMES)


def __getattr__(name: str) -> Any:
    module = _NAMES.get(name)
    if module is None:
        raise AttributeError(f"module 'polyclip.text' has no attribute {name!r}")
    return getattr(importlib.import_module(module), name)
