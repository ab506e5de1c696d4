import numpy as np
import pytest
import torch

from polyclip.text.lookup import CosineLookup, cosine_topk
from polyclip.text.word_vectors import load_word_vectors


@pytest.fixture(scope="module")
def glove():
    return load_word_vectors("glove-6b-50d")


@pytest.mark.parametrize(("query_chunk", "key_chunk"), [(1024, 65_536), (3, 7)])
def test_chunked_topk_matches_full_sort(query_chunk, key_chunk):
    g = torch.Generator().manual_seed(0)
    q, keys = torch.randn(10, 8, generator=g), torch.randn(50, 8, generator=g)
    scores, idx = cosine_topk(q, keys, 5, query_chunk=query_chunk, key_chunk=key_chunk)
    full = torch.nn.functional.normalize(q, dim=1) @ torch.nn.functional.normalize(keys, dim=1).T
    ref_s, ref_i = full.sort(dim=1, descending=True)
    assert torch.equal(idx, ref_i[:, :5])
    assert torch.allclose(scores, ref_s[:, :5], atol=1e-6)
    assert cosine_topk(q, keys[:3], 5)[1].shape == (10, 3)  # k capped at the number of keys


def test_label_lookup_ranks_related_classes(glove):
    classes = ["cat", "dog", "airplane", "truck", "frog"]
    lookup = CosineLookup.from_labels(classes, glove)
    result = lookup.search(torch.tensor(glove["kitten"])[None], k=2)[0]
    assert [name for name, _ in result] == ["cat", "dog"]
    assert result[0][1] == pytest.approx(float(glove.similarity("kitten", "cat")), abs=1e-5)
    # Unseen classes: any other list works the same way.
    unseen = CosineLookup.from_labels(["ankle boot", "sandal", "bag"], glove)
    assert unseen.search(torch.tensor(glove["sneaker"])[None], k=1)[0][0][0] in {"ankle boot", "sandal"}


def test_open_vocabulary_lookup(glove):
    vocab = CosineLookup.from_vocabulary(glove, n=20_000)
    assert len(vocab) == 20_000
    assert all(w.replace("-", "").isalpha() for w in vocab.names[:1000])
    assert vocab.names[0] == "the" and vocab.index_of(",") == -1
    result = vocab.search(torch.tensor(np.stack([glove["tiger"], glove["shark"]])), k=10)
    assert result[0][0][0] == "tiger" and result[0][0][1] == pytest.approx(1.0, abs=1e-5)
    assert {"lion", "leopard"} & {w for w, _ in result[0]}
    assert result[1][0][0] == "shark" and "whale" in {w for w, _ in result[1]}
    raw = CosineLookup.from_vocabulary(glove, n=100, words_only=False)
    assert raw.names == glove.index_to_key[:100]


def test_lookup_validates_shapes():
    with pytest.raises(ValueError, match="one vector per name"):
        CosineLookup(["a", "b"], np.zeros((3, 4)))


def test_open_vocabulary_hit_at_k_on_noisy_word_vectors(glove):
    from polyclip.metrics.ranking import hit_at_k

    vocab = CosineLookup.from_vocabulary(glove, n=50_000)
    words = ["tiger", "shark", "truck", "apple", "guitar", "river"]
    g = torch.Generator().manual_seed(0)
    clean = torch.tensor(np.stack([glove[w] for w in words]))
    noisy = clean + 0.6 * clean.norm(dim=1, keepdim=True) / 50**0.5 * torch.randn(clean.shape, generator=g)
    _, ranked = vocab.topk(noisy, k=10)
    hits = hit_at_k(ranked, [vocab.index_of(w) for w in words])
    assert hits["hit@1"] <= hits["hit@3"] <= hits["hit@5"] <= hits["hit@10"]
    assert hits["hit@10"] >= 0.5
    assert hit_at_k(vocab.topk(clean, k=1)[1], [vocab.index_of(w) for w in words], ks=(1,))["hit@1"] == 1.0
