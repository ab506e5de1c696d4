import gzip

import numpy as np
import pytest

from polyclip.text.word_vectors import WordVectorsError, keyed_vectors, load_word_vectors


@pytest.fixture(scope="module")
def glove():
    return load_word_vectors("glove-6b-50d")


def test_packaged_glove_has_real_similarities(glove):
    assert len(glove) == 400_000 and glove.vector_size == 50
    assert glove.similarity("cat", "dog") > 0.85
    assert glove.similarity("cat", "dog") > glove.similarity("cat", "airplane") + 0.3
    # GloVe files are frequency ordered: the most frequent word comes first.
    assert glove.index_to_key[0] == "the"


def test_loading_is_cached_per_process(glove):
    assert load_word_vectors("glove-6b-50d") is glove
    assert load_word_vectors() is glove


def test_limit_keeps_most_frequent_words():
    small = load_word_vectors("glove-6b-50d", limit=1000)
    assert len(small) == 1000 and "the" in small and small.index_to_key[:3] == ["the", ",", "."]


def _write_vectors(path, words, vectors, header):
    lines = [f"{len(words)} {vectors.shape[1]}"] if header else []
    lines += [w + " " + " ".join(f"{x:.6f}" for x in v) for w, v in zip(words, vectors)]
    path.write_text("\n".join(lines) + "\n")


def test_glove_and_word2vec_text_and_binary_files(tmp_path):
    rng = np.random.default_rng(0)
    words, vectors = ["alpha", "beta", "gamma"], rng.normal(size=(3, 4)).astype(np.float32)
    _write_vectors(tmp_path / "glove.txt", words, vectors, header=False)
    _write_vectors(tmp_path / "w2v.txt", words, vectors, header=True)
    kv_glove = load_word_vectors(f"glove:{tmp_path / 'glove.txt'}")
    kv_text = load_word_vectors(f"word2vec:{tmp_path / 'w2v.txt'}")
    kv_text.save_word2vec_format(str(tmp_path / "w2v.bin"), binary=True)
    with open(tmp_path / "w2v.bin", "rb") as src, gzip.open(tmp_path / "w2v.bin.gz", "wb") as dst:
        dst.write(src.read())
    kv_bin = load_word_vectors(f"word2vec:{tmp_path / 'w2v.bin'}")
    kv_gz = load_word_vectors(f"word2vec:{tmp_path / 'w2v.bin.gz'}")
    for kv in (kv_glove, kv_text, kv_bin, kv_gz):
        assert kv.index_to_key == words
        np.testing.assert_allclose(kv["gamma"], vectors[2], atol=1e-5)


def test_missing_file_names_the_spec(tmp_path):
    spec = f"glove:{tmp_path / 'nope.txt'}"
    with pytest.raises(WordVectorsError, match=r"nope\.txt") as info:
        load_word_vectors(spec)
    assert spec in str(info.value)


def test_unknown_spec_lists_valid_ones():
    with pytest.raises(WordVectorsError, match="glove-6b-50d"):
        load_word_vectors("fasttext:/x.vec")


def test_garbage_file_is_a_clear_error(tmp_path):
    (tmp_path / "bad.bin").write_bytes(b"not a header\n\x00\x01")
    with pytest.raises(WordVectorsError, match="cannot read"):
        load_word_vectors(f"word2vec:{tmp_path / 'bad.bin'}")


def test_keyed_vectors_rejects_duplicates():
    with pytest.raises(WordVectorsError, match="duplicate"):
        keyed_vectors(["a", "a"], np.zeros((2, 3), np.float32))
    kv = keyed_vectors(["a", "b"], np.eye(2, dtype=np.float32))
    assert kv.similarity("a", "b") == pytest.approx(0.0)
