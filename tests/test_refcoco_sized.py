"""The stand-in data of RefCOCO's sizes (datasets/refcoco_sized.py) that tools.scale_check and
tools.benchmark generate."""
import json
import os

import cv2

from datasets.refcoco_sized import IMAGE_SIZE, REFCOCO_SIZES, VOCAB_WORDS, generate, split_sizes, vocabulary_words
from datasets.tokens import tokenize


def test_split_sizes_scale_refcoco_and_keep_one_of_each():
    assert split_sizes(1.0) == REFCOCO_SIZES
    assert split_sizes(0.01)["train"] == (170, 424, 1206)
    assert split_sizes(1e-6)["val"] == (1, 1, 1)


def test_vocabulary_words_are_distinct_tokens_of_their_own():
    words = vocabulary_words()
    assert len(set(words)) == len(words) == VOCAB_WORDS
    assert all(tokenize(word) == [word] for word in words)


def test_generated_data_has_the_fraction_of_refcocos_sizes(tmp_path):
    fraction = 0.0003
    paths = generate(str(tmp_path), fraction, seed=0)
    with open(paths["annotations"]) as f:
        data = json.load(f)
    for split, (images, objects, expressions) in split_sizes(fraction).items():
        entries = data[split]
        assert len({entry["iid"] for entry in entries}) == images
        assert sum(len(entry["refs"]) for entry in entries) == expressions
        if split == "train":
            assert len(entries) == objects
        else:  # evaluation entries hold one expression each
            assert len(entries) == expressions and all(len(entry["refs"]) == 1 for entry in entries)
    iids = {entry["iid"] for entries in data.values() for entry in entries}
    image = cv2.imread(os.path.join(paths["images"], f"{min(iids)}.jpg"))
    assert image.shape == (IMAGE_SIZE[1], IMAGE_SIZE[0], 3)
