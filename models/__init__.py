"""The weakly supervised REC model, its frozen detector and their losses."""
from __future__ import annotations

import numpy as np

from .detector_cache import DetectorCache
from .rec import REC

__all__ = ["REC", "DetectorCache", "build_model"]


def build_model(cfg, pretrained_emb: np.ndarray | None, token_size: int) -> REC:
    """The model described by ``cfg``; ``pretrained_emb`` is ``[token_size, WORD_EMBED_SIZE]``
    (used when ``USE_GLOVE``). Detector weights are loaded separately
    (``utils.checkpoint.load_pretrained_backbone``)."""
    return REC(cfg, pretrained_emb, token_size)
