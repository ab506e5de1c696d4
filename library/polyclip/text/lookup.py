"""Ranked cosine look-up of embeddings among named vectors (DeViSE's "ranked similarity").

One :class:`CosineLookup` serves the three DeViSE read-outs:

* the training classes: ``CosineLookup.from_labels(train_classes, kv)``;
* any class list, unseen classes included: ``CosineLookup.from_labels(other_classes, kv)``;
* an open vocabulary of the ``n`` most frequent words:
  ``CosineLookup.from_vocabulary(kv, n=50_000)`` (GloVe and word2vec files are
  frequency ordered, so the first ``n`` rows are the most frequent words).

The search is a matmul of L2-normalised matrices followed by ``torch.topk``, chunked
over queries and keys so 10k queries against 400k words stay within a few hundred MB.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING

import numpy as np
import torch
import torch.nn.functional as F

from polyclip.text.label_vectors import label_vectors

if TYPE_CHECKING:
    from gensim.models import KeyedVectors

_WORD = re.compile(r"^[a-z]+(?:-[a-z]+)*$")


def cosine_topk(queries: torch.Tensor, keys: torch.Tensor, k: int, *, query_chunk: int = 1024,
                key_chunk: int = 65_536, normalized_keys: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """The ``k`` keys most cosine-similar to each query.

    Args:
        queries: ``(N, D)``.
        keys: ``(M, D)``.
        k: Results per query (capped at ``M``).
        query_chunk: Queries per matmul.
        key_chunk: Keys per matmul; peak memory is about ``query_chunk * key_chunk`` floats.
        normalized_keys: The keys already have unit norm (skip normalising them again).

    Returns:
        ``(scores, indices)``, each ``(N, k)``, best first.
    """
    k = min(k, keys.shape[0])
    q_all = F.normalize(queries.float(), dim=1)
    keys = keys.float() if normalized_keys else F.normalize(keys.float(), dim=1)
    scores_out, index_out = [], []
    for q in q_all.split(query_chunk):
        best_s = torch.full((len(q), 0), float("-inf"), device=q.device)
        best_i = torch.zeros((len(q), 0), dtype=torch.long, device=q.device)
        for start in range(0, keys.shape[0], key_chunk):
            s, i = (q @ keys[start:start + key_chunk].T).topk(min(k, len(keys[start:start + key_chunk])), dim=1)
            # Merge this chunk's best with the running best, keep the top k.
            best_s, order = torch.cat([best_s, s], dim=1).topk(min(k, best_s.shape[1] + s.shape[1]), dim=1)
            best_i = torch.cat([best_i, i + start], dim=1).gather(1, order)
        scores_out.append(best_s)
        index_out.append(best_i)
    return torch.cat(scores_out), torch.cat(index_out)


class CosineLookup:
    """Named unit vectors searched by cosine similarity.

    Args:
        names: ``M`` names (class names or words), in row order.
        vectors: ``(M, D)`` vectors (normalised here).
        query_chunk: Queries per matmul in :meth:`topk`.
        key_chunk: Keys per matmul in :meth:`topk`.

    Example:
        >>> kv = load_word_vectors()  # doctest: +SKIP
        >>> words = CosineLookup.from_vocabulary(kv, n=20_000)  # doctest: +SKIP
        >>> words.search(torch.from_numpy(kv["tiger"])[None], k=3)  # doctest: +SKIP
        [[('tiger', 1.0), ...]]
    """

    def __init__(self, names: Sequence[str], vectors: np.ndarray | torch.Tensor, *, query_chunk: int = 1024,
                 key_chunk: int = 65_536) -> None:
        matrix = torch.as_tensor(np.asarray(vectors) if not isinstance(vectors, torch.Tensor) else vectors)
        if matrix.ndim != 2 or matrix.shape[0] != len(names):
            raise ValueError(f"need one vector per name: {len(names)} names, vectors of shape {tuple(matrix.shape)}")
        self.names = list(names)
        self.vectors = F.normalize(matrix.detach().float(), dim=1)
        self.query_chunk = query_chunk
        self.key_chunk = key_chunk
        self._index = {name: i for i, name in enumerate(self.names)}

    @classmethod
    def from_labels(cls, labels: Sequence[str], kv: KeyedVectors, *, head_word: bool = False,
                    overrides: Mapping[str, str] | None = None) -> CosineLookup:
        """Look-up over class labels (training or unseen), vectors by :func:`label_vectors`."""
        return cls(labels, label_vectors(labels, kv, head_word=head_word, overrides=overrides))

    @classmethod
    def from_vocabulary(cls, kv: KeyedVectors, n: int | None = 50_000, *, words_only: bool = True) -> CosineLookup:
        """Look-up over the ``n`` most frequent words of a frequency-ordered vocabulary.

        Args:
            kv: Word vectors, most frequent first (GloVe, word2vec).
            n: Words to keep (all when None); GloVe 6B has 400,000.
            words_only: Keep only lowercase alphabetic words (``t-shirt`` passes;
                punctuation, numbers and ``'s`` do not). ``n`` counts kept words.
        """
        keys = kv.index_to_key
        if words_only:
            rows = [i for i, word in enumerate(keys) if _WORD.match(word)]
            rows = rows[:n] if n is not None else rows
        else:
            rows = list(range(len(keys) if n is None else min(n, len(keys))))
        vectors = kv.vectors[rows] if len(rows) < len(keys) else kv.vectors
        return cls([keys[i] for i in rows], vectors)

    def __len__(self) -> int:
        return len(self.names)

    def index_of(self, name: str) -> int:
        """Row of ``name``, or -1 when absent (a hit@k target that can never be hit)."""
        return self._index.get(name, -1)

    def topk(self, queries: torch.Tensor, k: int = 5) -> tuple[torch.Tensor, torch.Tensor]:
        """``(scores, indices)`` of the ``k`` nearest names per query, each ``(N, k)``, best first."""
        return cosine_topk(queries.detach().to(self.vectors.device), self.vectors, k, query_chunk=self.query_chunk,
                           key_chunk=self.key_chunk, normalized_keys=True)

    def search(self, queries: torch.Tensor, k: int = 5) -> list[list[tuple[str, float]]]:
        """The ``k`` nearest names per query with their cosine similarity, best first."""
        scores, indices = self.topk(queries, k)
        return [[(self.names[i], float(s)) for s, i in zip(row_s.tolist(), row_i.tolist())]
                for row_s, row_i in zip(scores, indices)]


__all__ = ["CosineLookup", "cosine_topk"]
