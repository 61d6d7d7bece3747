"""The weakly supervised REC model, the supervised student, the frozen detector and their losses."""
from __future__ import annotations

import numpy as np

from .detector_cache import DetectorCache
from .rec import REC
from .student import Student

__all__ = ["REC", "Student", "DetectorCache", "build_model"]


def build_model(cfg, pretrained_emb: np.ndarray | None, token_size: int) -> REC | Student:
    """The model ``cfg.ARCH`` names; ``pretrained_emb`` is ``[token_size, WORD_EMBED_SIZE]``
    (used when ``USE_GLOVE``). Detector weights are loaded separately
    (``utils.checkpoint.load_pretrained_backbone``)."""
    return (Student if cfg.ARCH == "student" else REC)(cfg, pretrained_emb, token_size)
