import os
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from tiny_data import make_tiny_dataset  # noqa: E402 (the path above finds it)

torch.set_num_threads(min(2, torch.get_num_threads()))


@pytest.fixture
def tiny_overrides():
    """A model small enough to train in seconds on a CPU; the config keys of the real one."""
    return ["INPUT_SHAPE=[128, 128]", "VIS_WIDTH=0.125", "HIDDEN_SIZE=64", "FF_SIZE=128",
            "MULTI_HEAD=4", "N_SA=1", "SELECT_NUM=8", "WORD_EMBED_SIZE=16", "USE_GLOVE=false",
            "MAX_TOKEN=6", "CLASS_NUM=3", "PRETRAIN_WEIGHT=none"]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """The tiny dataset (tests/tiny_data.py), made once per test module: (root, annotation file,
    image folder)."""
    root = tmp_path_factory.mktemp("tiny")
    ann, images = make_tiny_dataset(str(root))
    return root, ann, images
