"""Position words read from a lexicon (POSITION_WORDS, beyond the published methods): where an
expression says where its referent is ("the circle on the left"), the candidates the model finds
plausible for it are ordered by where they are.

Why a lexicon. Two alike objects of one image differ only in where they are, and what tells a weak
model which of them "left" names is faint: an image described by "the circle on the left" always
holds a circle on its left, but nearly always one on its right as well, so images hardly differ by
it, and no within-image loss says which of two referents is which. Every weak model here stays near
chance on position words. Eleven words and their directions are knowledge no box carries, and they
decide only between the objects the model already reads as fitting the rest of the expression.

The rule. Candidates overlapping with IoU > 0.5 are one object (the best-scored stands for them,
as non-maximum suppression keeps it). The objects scoring within ``tolerance`` of the best (log-
probabilities: ``tolerance`` nats) are plausible; their scores are handed out again in the order
of their centres along the expression's direction, the best score to the one furthest that way.
The best is then the plausible object furthest in the direction, and anything that ranks the
scores (an argmax, a joint assignment of an image's referents) ranks them so.
"""
from __future__ import annotations

from typing import Iterable, Sequence

import torch
from torch import nn
from torchvision.ops import nms

# Unit directions in image coordinates (x right, y down). Words of one axis that disagree cancel.
LEXICON = {
    "left": (-1.0, 0.0), "leftmost": (-1.0, 0.0),
    "right": (1.0, 0.0), "rightmost": (1.0, 0.0),
    "top": (0.0, -1.0), "topmost": (0.0, -1.0), "upper": (0.0, -1.0),
    "bottom": (0.0, 1.0), "bottommost": (0.0, 1.0), "lower": (0.0, 1.0), "lowest": (0.0, 1.0),
}
# Boxes overlapping with IoU above this are one object (here and in the pseudo-label export): Acc@0.5
# could hardly tell them apart, and the detector's neighbouring cells often predict the same object.
MERGE_IOU = 0.5


def direction(words: Iterable[str]) -> tuple[float, float]:
    """The summed direction of the lexicon's words among ``words`` (lower-case tokens); (0, 0) when
    none is there or they cancel."""
    dx = dy = 0.0
    for word in words:
        x, y = LEXICON.get(word, (0.0, 0.0))
        dx, dy = dx + x, dy + y
    return dx, dy


def reorder(scores: torch.Tensor, centres: torch.Tensor, towards: torch.Tensor, tolerance: float) -> torch.Tensor:
    """``scores`` ``[G]`` of G distinct objects (``-inf``: not a candidate) with their scores handed out
    again: those within ``tolerance`` of the best, in descending order, to the same objects sorted by
    how far their ``centres`` ``[G,2]`` lie along ``towards`` ``[2]``. Unchanged where ``towards`` is
    zero or fewer than two objects are plausible."""
    if not bool(towards.any()):
        return scores
    plausible = torch.nonzero(scores >= scores.max() - tolerance).flatten()
    if plausible.numel() < 2:
        return scores
    along = centres[plausible].to(towards.dtype) @ towards
    out = scores.clone()
    out[plausible[along.argsort(descending=True, stable=True)]] = scores[plausible].sort(descending=True).values
    return out


def build_position_words(cfg, vocab: Sequence[str] | None) -> "PositionWords | None":
    """The model's :class:`PositionWords` where ``cfg.POSITION_WORDS`` asks for the lexicon, else None."""
    if cfg.POSITION_WORDS == "none":
        return None
    if vocab is None:
        raise ValueError("POSITION_WORDS: lexicon needs the vocabulary (build_model(..., vocab=))")
    return PositionWords(vocab, cfg.POSITION_TOLERANCE)


class PositionWords(nn.Module):
    """The lexicon over a vocabulary: ``choose(scores [B,K], boxes [B,K,4+], refs [B,T])`` -> the
    candidate ``[B]`` each expression (token ids ``refs``) gets, by :func:`reorder` of its
    log-softmaxed ``scores`` (the weak model's anchor similarities, the student's cell objectness
    logits); the best-scored candidate where the expression holds no position word."""

    def __init__(self, vocab: Sequence[str], tolerance: float):
        super().__init__()
        self.tolerance = tolerance
        # Not part of the checkpoint: a function of the vocabulary, which the checkpoint already fixes.
        self.register_buffer("directions", torch.tensor([LEXICON.get(token, (0.0, 0.0)) for token in vocab]),
                             persistent=False)

    def choose(self, scores: torch.Tensor, boxes: torch.Tensor, refs: torch.Tensor) -> torch.Tensor:
        towards = self.directions[refs].sum(dim=1)  # [B, 2]
        log_probs = scores.float().log_softmax(dim=1)
        chosen = log_probs.argmax(dim=1)
        for i in torch.nonzero(towards.any(dim=1)).flatten().tolist():
            objects = nms(boxes[i, :, :4].float(), log_probs[i], MERGE_IOU)  # best first
            centres = (boxes[i, objects, :2] + boxes[i, objects, 2:4]).float() / 2
            chosen[i] = objects[reorder(log_probs[i, objects], centres, towards[i], self.tolerance).argmax()]
        return chosen
