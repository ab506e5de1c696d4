"""The language layer: word vectors, label vectors, look-up and CLIP zero-shot heads."""

from polyclip.text.label_vectors import (
    MissingLabelVectorsError,
    label_alternatives,
    label_similarity_matrix,
    label_vectors,
    resolve_label,
    resolve_labels,
    sentence_label_vectors,
)
from polyclip.text.word_vectors import DEFAULT_WORD_VECTORS, WordVectorsError, keyed_vectors, load_word_vectors

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
