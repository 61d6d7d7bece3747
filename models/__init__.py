"""The weakly supervised REC model and its weight formats."""
from __future__ import annotations

import numpy as np

from .checkpoint import (CheckpointMismatchError, load_pretrained_backbone, load_reference_state_dict,
                         reference_state_dict)
from .detector_cache import DetectorCache
from .net import REC

__all__ = ["REC", "DetectorCache", "build_model", "load_reference_state_dict", "load_pretrained_backbone",
           "reference_state_dict", "CheckpointMismatchError"]


def build_model(cfg, pretrained_emb: np.ndarray | None, token_size: int) -> REC:
    """The model described by ``cfg``; ``pretrained_emb`` is ``[token_size, WORD_EMBED_SIZE]``
    (used when ``USE_GLOVE``). Detector weights are loaded separately (``load_pretrained_backbone``)."""
    return REC(cfg, pretrained_emb, token_size)
