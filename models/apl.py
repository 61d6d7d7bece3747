"""APL (ECCV 2024, "Anchor-based Prompt Learning for One-stage Weakly Supervised REC") on the weak model.

Anchor prompts tell each selected anchor's embedding where the anchor is (a sine embedding of its
centre), what colour its box holds (one of APL's 13 colour words) and what the detector thinks it is
(its most likely class name); a text reconstruction loss asks the best anchor to carry the
expression's meaning. The visual alignment head is in ``models/alignment.py``.

Shapes: B images, K selected anchors, E expressions per image, D = HIDDEN_SIZE, C detector classes,
S the input side. Anchor embeddings may also be ``[B_text, B_image, K, D]`` (the CMA conditioned
per expression); prompts, one per image, broadcast over the text axis.
"""
from __future__ import annotations

import math
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from datasets.tokens import PAD, UNK, tokenize

from .language_encoder import LanguageEncoder

# APL's reference colours (RGB in [0, 1]) and their words, in APL's order (ties go to the first).
APL_COLOURS = {
    "blue": (0.0, 0.0, 1.0), "gray": (0.5, 0.5, 0.5), "green": (0.0, 1.0, 0.0), "red": (1.0, 0.0, 0.0),
    "yellow": (1.0, 1.0, 0.0), "orange": (1.0, 0.5, 0.0), "purple": (0.5, 0.0, 0.5),
    "brown": (0.6, 0.4, 0.2), "black": (0.0, 0.0, 0.0), "white": (1.0, 1.0, 1.0),
    "pink": (1.0, 0.75, 0.8), "maroon": (0.5, 0.0, 0.0), "turquoise": (0.0, 1.0, 1.0),
}
_TEMPERATURE = 10000.0  # of the sine embedding, as in DETR and APL


def sine_position_embedding(xy: torch.Tensor, dim: int) -> torch.Tensor:
    """Centres ``[..., 2]`` (x, y in [0, 1] of the input side) -> ``[..., dim]``: y's features then
    x's, each ``dim / 2`` of them ``sin`` (even i) or ``cos`` (odd i) of
    ``2 pi coord / 10000^(2 floor(i / 2) / (dim / 2))``."""
    half = dim // 2
    i = torch.arange(half, device=xy.device, dtype=torch.float32)
    frequency = _TEMPERATURE ** (2 * torch.div(i, 2, rounding_mode="floor") / half)
    angles = xy.float()[..., None] * (2 * math.pi) / frequency  # [..., 2, half]
    features = torch.where(i % 2 == 0, angles.sin(), angles.cos())
    return torch.cat([features[..., 1, :], features[..., 0, :]], dim=-1)


def region_mean_colours(images: torch.Tensor, boxes: torch.Tensor, mean: torch.Tensor,
                        std: torch.Tensor) -> torch.Tensor:
    """The mean RGB (in [0, 1]) of each box's pixels, for the whole batch at once.

    images ``[B,3,S,S]`` normalised with ``mean``, ``std`` ``[3]``; boxes ``[B,K,4]`` (cx, cy, w, h)
    in input pixels -> ``[B,K,3]``. Corners are clamped to the image and truncated to whole pixels
    as APL does; a box with no whole pixel reads the one pixel at its top-left corner (APL: NaN).
    A box's sum is its column mask, then its row mask, applied to the image: two batched matrix
    products."""
    b, _, height, width = images.shape
    rgb = images.float() * std.float()[:, None, None] + mean.float()[:, None, None]
    cx, cy, w, h = boxes.float().unbind(-1)
    x1 = (cx - w / 2).clamp(0, width - 1).long()
    y1 = (cy - h / 2).clamp(0, height - 1).long()
    x2 = torch.maximum((cx + w / 2).clamp(0, width).long(), x1 + 1)
    y2 = torch.maximum((cy + h / 2).clamp(0, height).long(), y1 + 1)
    cols = torch.arange(width, device=images.device)
    rows = torch.arange(height, device=images.device)
    col_mask = ((cols >= x1[..., None]) & (cols < x2[..., None])).float()  # [B, K, W]
    row_mask = ((rows >= y1[..., None]) & (rows < y2[..., None])).float()  # [B, K, H]
    per_row = rgb.flatten(1, 2) @ col_mask.transpose(1, 2)  # [B, 3*H, K]
    sums = torch.einsum("bchk,bkh->bkc", per_row.view(b, 3, height, -1), row_mask)
    return sums / ((x2 - x1) * (y2 - y1))[..., None]


def nearest_colour(colours: torch.Tensor, references: torch.Tensor) -> torch.Tensor:
    """colours ``[..., 3]``, references ``[N, 3]`` -> the index of the nearest reference (Euclidean)."""
    return torch.cdist(colours.float().flatten(0, -2), references).argmin(dim=1).view(colours.shape[:-1])


def word_ids(words: Sequence[str], vocab: Sequence[str]) -> list[int]:
    """Token ids of ``words`` (each tokenized as an expression); words not in ``vocab`` are UNK."""
    index = {token: i for i, token in enumerate(vocab)}
    return [index.get(token, UNK) for word in words for token in tokenize(word)]


class AnchorPrompts(nn.Module):
    """APL's anchor prompt encoder and its soft-weighted fusion.

    ``forward(anchors, images, anchor_boxes)`` -> ``(visual, scored)``: ``visual`` the prompted
    anchor embeddings (APL's ``visual_emb``, what the text reconstruction reads) and ``scored``
    what the expression is matched against: ``visual`` plus the projected tag embedding, so that a
    dot product with the expression is APL's ``sim_vis + sim_tag``.

    With weights ``w = softmax(W (v + p + t))`` over the parts present (visual v, position p, tag t):
    ``visual = P_v(v w_v) + P_t(t w_t) + p w_p`` and ``scored = visual + P_t(t)``.
    """

    def __init__(self, cfg, vocab: Sequence[str], pretrained_emb: np.ndarray | None, token_size: int):
        super().__init__()
        hidden = cfg.HIDDEN_SIZE
        self.hidden = hidden
        self.position = cfg.APL_POSITION_PROMPT
        self.colour = cfg.APL_COLOUR_PROMPT
        self.category = cfg.APL_CATEGORY_PROMPT
        self.tag = self.colour or self.category
        self.register_buffer("mean", torch.tensor(cfg.MEAN, dtype=torch.float32), persistent=False)
        self.register_buffer("std", torch.tensor(cfg.STD, dtype=torch.float32), persistent=False)
        self.register_buffer("colour_rgb", torch.tensor(list(APL_COLOURS.values())), persistent=False)
        self.register_buffer("colour_ids", torch.tensor(word_ids(list(APL_COLOURS), vocab)), persistent=False)
        names = [word_ids([name], vocab) for name in cfg.DETECTOR_CLASS_NAMES]
        longest = max(len(ids) for ids in names)
        self.register_buffer("class_tokens", torch.tensor([ids + [PAD] * (longest - len(ids)) for ids in names]),
                             persistent=False)  # [C, L]
        self.visual_proj = nn.Linear(hidden, hidden)
        self.soft_weights = nn.Linear(hidden, 1 + self.position + self.tag)
        if self.tag:
            self.tag_encoder = LanguageEncoder(
                token_size, cfg.WORD_EMBED_SIZE, hidden, cfg.N_SA, cfg.MULTI_HEAD, cfg.FF_SIZE, cfg.DROPOUT_R,
                pretrained_emb if cfg.USE_GLOVE else None, cfg.EMBED_FREEZE)
            self.tag_proj = nn.Linear(hidden, hidden)

    def tag_tokens(self, images: torch.Tensor, anchor_boxes: torch.Tensor) -> torch.Tensor:
        """Each anchor's tag, ``[B,K,T]`` token ids: its colour word (APL_COLOUR_PROMPT), then its most
        likely class's name (APL_CATEGORY_PROMPT). ``anchor_boxes`` ``[B,K,4,5+C]``; APL averages the
        cell's 4 boxes for both."""
        cell = anchor_boxes.float().mean(dim=2)  # [B, K, 5+C]
        parts = []
        if self.colour:
            rgb = region_mean_colours(images, cell[..., :4], self.mean, self.std)
            parts.append(self.colour_ids[nearest_colour(rgb, self.colour_rgb)][..., None])
        if self.category:
            parts.append(self.class_tokens[cell[..., 5:].argmax(dim=-1)])
        return torch.cat(parts, dim=-1)

    def position_embedding(self, anchor_boxes: torch.Tensor, size: int) -> torch.Tensor:
        """``[B,K,D]``: the sine embedding of each cell's mean box centre over the input side."""
        return sine_position_embedding(anchor_boxes[..., :2].float().mean(dim=2) / size, self.hidden)

    def forward(self, anchors: torch.Tensor, images: torch.Tensor,
                anchor_boxes: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        prompts = []
        if self.position:
            prompts.append(self.position_embedding(anchor_boxes, images.shape[-1]).to(anchors.dtype))
        if self.tag:
            tokens = self.tag_tokens(images, anchor_boxes)
            tag, _ = self.tag_encoder(tokens.flatten(0, 1))
            prompts.append(tag.view(*tokens.shape[:2], -1).to(anchors.dtype))
        weights = self.soft_weights(anchors + sum(prompts)).softmax(dim=-1)
        visual = self.visual_proj(anchors * weights[..., :1])
        if self.position:
            visual = visual + prompts[0] * weights[..., 1:2]
        if not self.tag:
            return visual, visual
        visual = visual + self.tag_proj(prompts[-1] * weights[..., -1:])
        return visual, visual + self.tag_proj(prompts[-1])


class TextReconstruction(nn.Module):
    """APL's reconstruction: an MLP decodes the best anchor's embedding back into the expression's.

    ``forward(visual [B,K,D], texts [B,E,D])`` -> the MSE between each expression's decoded best
    anchor and the expression's embedding (detached: the target does not move towards the anchor).
    The best anchor is the one of the expression's own image with the highest ``visual . text``
    (``batch_sum``: ranked by ``sum over images of visual . text``, as APL's code computes it).
    """

    def __init__(self, hidden: int, anchor: str = "own"):
        super().__init__()
        self.batch_sum = anchor == "batch_sum"
        self.decoder = nn.Sequential(nn.Linear(hidden, hidden), nn.ReLU(inplace=True), nn.Linear(hidden, hidden),
                                     nn.ReLU(inplace=True), nn.Linear(hidden, hidden))

    def forward(self, visual: torch.Tensor, texts: torch.Tensor) -> torch.Tensor:
        texts = texts.transpose(0, 1)  # [E, B, D]
        if self.batch_sum:
            sim = torch.einsum("ebd,kd->ebk", texts, visual.sum(dim=0))
        else:
            sim = torch.einsum("ebd,bkd->ebk", texts, visual)
        rows = torch.arange(visual.shape[0], device=visual.device)
        best = visual[rows, sim.argmax(dim=-1)]  # [E, B, D]
        return F.mse_loss(self.decoder(best), texts.detach())
