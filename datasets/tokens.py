"""Tokenisation, vocabulary and the several-expressions-per-sample rule of the reference.

Every rule here is the reference's, quirks included, because token ids index
the word embedding: a different vocabulary order would silently scramble a
checkpoint trained by the reference code.
"""
from __future__ import annotations

import re
from typing import Iterable, Mapping, Sequence

import numpy as np

SPECIAL_TOKENS = ("PAD", "UNK", "CLS")
PAD, UNK, CLS = 0, 1, 2

# The reference deletes these characters and turns '-' and '/' into spaces;
# every other character (digits, '&', '$', accented letters...) stays in the word.
_DELETED = re.compile(r"[.,'!?\"()*#:;]")


def tokenize(text: str) -> list[str]:
    """Lower-cased words of an expression; an all-punctuation expression gives no words."""
    return _DELETED.sub("", text.lower()).replace("-", " ").replace("/", " ").split()


def build_vocab(annotations: Mapping[str, Sequence[Mapping]]) -> tuple[list[str], int]:
    """Tokens by id over every split of the file, and the longest expression in words.

    Order: PAD, UNK, CLS, then words by first appearance, walking the splits in
    the file's order. Splits that a run does not use still add their words, so
    one vocabulary (and one embedding) serves every split of the file.
    """
    index = {token: i for i, token in enumerate(SPECIAL_TOKENS)}
    longest = 0
    for entries in annotations.values():
        for entry in entries:
            for text in entry["refs"]:
                words = tokenize(text)
                longest = max(longest, len(words))
                for word in words:
                    index.setdefault(word, len(index))
    return list(index), longest


def encode(text: str, token_to_ix: Mapping[str, int], max_token: int) -> np.ndarray:
    """int64 ids of length ``max_token``: words truncated, the rest PAD, unknown words UNK.

    An expression with no words is all PAD, as in the reference; the language
    encoder then sees a fully masked sequence.
    """
    ids = np.zeros(max_token, np.int64)
    for position, word in enumerate(tokenize(text)[:max_token]):
        ids[position] = token_to_ix.get(word, UNK)
    return ids


def select_expressions(count: int, primary: int, num_refs: int) -> list[int]:
    """Which of an object's ``count`` expressions a sample carries, given its primary one.

    The primary first, then the other expressions in file order; when there are
    too few, the primary fills the remaining places (one expression: p, p, p;
    two: p, other, p).
    """
    if not 0 <= primary < count:
        raise IndexError(f"primary expression {primary} out of range for {count} expressions")
    chosen = [primary] + [i for i in range(count) if i != primary][: num_refs - 1]
    return chosen + [primary] * (num_refs - len(chosen))


def encode_many(texts: Iterable[str], token_to_ix: Mapping[str, int], max_token: int) -> np.ndarray:
    """``[len(texts), max_token]`` int64 ids."""
    rows = [encode(text, token_to_ix, max_token) for text in texts]
    return np.stack(rows) if rows else np.zeros((0, max_token), np.int64)
