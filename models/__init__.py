"""The weakly supervised REC model, the supervised student, their frozen detector and their losses."""
from __future__ import annotations

from typing import Sequence

import numpy as np

from .detector_cache import DetectorCache
from .rec import REC
from .student import Student

__all__ = ["REC", "Student", "DetectorCache", "build_model"]


def build_model(cfg, pretrained_emb: np.ndarray | None, token_size: int,
                vocab: Sequence[str] | None = None) -> REC | Student:
    """The model ``cfg.ARCH`` names; ``pretrained_emb`` is ``[token_size, WORD_EMBED_SIZE]``
    (used when ``USE_GLOVE``); ``vocab``, the tokens by id, is needed by APL's colour and category
    prompts and by POSITION_WORDS. Detector weights are loaded separately
    (``utils.checkpoint.load_pretrained_backbone``)."""
    if cfg.ARCH == "student":
        return Student(cfg, pretrained_emb, token_size, vocab)
    return REC(cfg, pretrained_emb, token_size, vocab)
