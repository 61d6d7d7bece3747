"""The weakly supervised REC model, the supervised student, and their weight formats."""
from __future__ import annotations

from typing import Sequence

import numpy as np

from .checkpoint import (CheckpointMismatchError, load_pretrained_backbone, load_reference_state_dict,
                         reference_state_dict)
from .detector_cache import DetectorCache
from .net import REC
from .student import Student

__all__ = ["REC", "Student", "DetectorCache", "build_model", "load_reference_state_dict", "load_pretrained_backbone",
           "reference_state_dict", "CheckpointMismatchError"]


def build_model(cfg, pretrained_emb: np.ndarray | None, token_size: int,
                vocab: Sequence[str] | None = None) -> REC | Student:
    """The model ``cfg.ARCH`` names; ``pretrained_emb`` is ``[token_size, WORD_EMBED_SIZE]``
    (used when ``USE_GLOVE``); ``vocab``, the tokens by id, is needed by APL's colour and category
    prompts. Detector weights are loaded separately (``load_pretrained_backbone``)."""
    if cfg.ARCH == "student":
        return Student(cfg, pretrained_emb, token_size)
    return REC(cfg, pretrained_emb, token_size, vocab)
