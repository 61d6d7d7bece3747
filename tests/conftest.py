import os
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

torch.set_num_threads(min(2, torch.get_num_threads()))


@pytest.fixture
def tiny_overrides():
    """A model small enough to train in seconds on a CPU; the config keys of the real one."""
    return ["INPUT_SHAPE=[128, 128]", "VIS_WIDTH=0.125", "HIDDEN_SIZE=64", "FF_SIZE=128",
            "MULTI_HEAD=4", "N_SA=1", "SELECT_NUM=8", "WORD_EMBED_SIZE=16", "USE_GLOVE=false",
            "MAX_TOKEN=6", "CLASS_NUM=3", "PRETRAIN_WEIGHT=none"]
