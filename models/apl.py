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


def unnormalize(images: torch.Tensor, mean: torch.Tensor, std: torch.Tensor, mode: str) -> torch.Tensor:
    """Normalised images ``[B,3,S,S]`` back to RGB. ``'per_channel'``: ``x * std[c] + mean[c]``.
    ``'batch_axis'`` (APL's code): APL's ``unnormalize`` zips the (mean, std) pairs with the *batch*
    axis, so image i < 3 gets pair i on all three channels and the other images stay normalised."""
    if mode == "per_channel":
        return images.float() * std.float()[:, None, None] + mean.float()[:, None, None]
    rgb = images.float().clone()
    n = min(len(mean), rgb.shape[0])
    rgb[:n] = rgb[:n] * std.float()[:n, None, None, None] + mean.float()[:n, None, None, None]
    return rgb


def region_mean_colours(rgb: torch.Tensor, boxes: torch.Tensor, empty_box: str = "first_colour") -> torch.Tensor:
    """The mean colour of each box's pixels, for the whole batch at once.

    rgb ``[B,3,S,S]``; boxes ``[B,K,4]`` (cx, cy, w, h) in input pixels -> ``[B,K,3]``. Corners are
    divided by the side, clamped to [0, 1], scaled back and truncated to whole pixels, as APL does. A
    box with no whole pixel has no mean (NaN, APL's ``'first_colour'``) or reads the one pixel at its
    clamped top-left corner (``'one_pixel'``). A box's sum is its column mask, then its row mask,
    applied to the image: two batched matrix products."""
    b, _, height, width = rgb.shape
    cx, cy, w, h = boxes.float().unbind(-1)

    def pixel(coordinate: torch.Tensor, side: int) -> torch.Tensor:
        return ((coordinate / side).clamp(0, 1) * side).long()

    x1, x2 = pixel(cx - w / 2, width), pixel(cx + w / 2, width)
    y1, y2 = pixel(cy - h / 2, height), pixel(cy + h / 2, height)
    if empty_box == "one_pixel":
        x1, y1 = x1.clamp(max=width - 1), y1.clamp(max=height - 1)
        x2, y2 = torch.maximum(x2, x1 + 1), torch.maximum(y2, y1 + 1)
    cols = torch.arange(width, device=rgb.device)
    rows = torch.arange(height, device=rgb.device)
    col_mask = ((cols >= x1[..., None]) & (cols < x2[..., None])).float()  # [B, K, W]
    row_mask = ((rows >= y1[..., None]) & (rows < y2[..., None])).float()  # [B, K, H]
    per_row = rgb.float().flatten(1, 2) @ col_mask.transpose(1, 2)  # [B, 3*H, K]
    sums = torch.einsum("bchk,bkh->bkc", per_row.view(b, 3, height, -1), row_mask)
    area = (x2 - x1).clamp(min=0) * (y2 - y1).clamp(min=0)
    return sums / area[..., None]  # 0 / 0 = NaN where the box holds no pixel


def nearest_colour(colours: torch.Tensor, references: torch.Tensor) -> torch.Tensor:
    """colours ``[..., 3]``, references ``[N, 3]`` -> the index of the nearest reference (Euclidean).
    A NaN colour gets index 0: APL's ``min`` over distances keeps its first candidate when every
    comparison with NaN is false."""
    flat = colours.float().flatten(0, -2)
    index = torch.cdist(flat, references).argmin(dim=1)
    return torch.where(flat.isnan().any(dim=1), 0, index).view(colours.shape[:-1])


# The colour words APL's code has ids for (its colour_dict): 'maroon' and 'turquoise' are UNK there.
APL_COLOUR_DICT_WORDS = tuple(word for word in APL_COLOURS if word not in ("maroon", "turquoise"))


def word_ids(words: Sequence[str], vocab: Sequence[str]) -> list[int]:
    """Token ids of ``words`` (each tokenized as an expression); words not in ``vocab`` are UNK."""
    index = {token: i for i, token in enumerate(vocab)}
    return [index.get(token, UNK) for word in words for token in tokenize(word)]


def tag_word_ids(words: Sequence[str], vocab: Sequence[str], rule: str,
                 known: Sequence[str] | None = None) -> list[list[int]]:
    """The token ids of each tag word (a colour or a class name). ``'tokens'``: the word tokenized,
    each token looked up. ``'apl'`` (APL's code): the whole string looked up as one token, so a
    two-word class name is UNK, and a word outside ``known`` (if given) is UNK."""
    if rule == "tokens":
        return [word_ids([word], vocab) for word in words]
    index = {token: i for i, token in enumerate(vocab)}
    return [[index.get(word, UNK) if known is None or word in known else UNK] for word in words]


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
        self.unnormalize = cfg.APL_UNNORMALIZE
        self.empty_box = cfg.APL_COLOUR_EMPTY_BOX
        self.position_side = cfg.APL_POSITION_SIDE
        known = APL_COLOUR_DICT_WORDS if cfg.APL_TAG_WORDS == "apl" else None
        colour_ids = tag_word_ids(list(APL_COLOURS), vocab, cfg.APL_TAG_WORDS, known)
        self.register_buffer("colour_ids", torch.tensor([ids[0] for ids in colour_ids]), persistent=False)
        names = tag_word_ids(cfg.DETECTOR_CLASS_NAMES, vocab, cfg.APL_TAG_WORDS)
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
            rgb = unnormalize(images, self.mean, self.std, self.unnormalize)
            # APL takes abs() of the means: a no-op on RGB, but it folds the values of the images its
            # batch-axis unnormalize leaves normalised.
            colours = region_mean_colours(rgb, cell[..., :4], self.empty_box).abs()
            parts.append(self.colour_ids[nearest_colour(colours, self.colour_rgb)][..., None])
        if self.category:
            parts.append(self.class_tokens[cell[..., 5:].argmax(dim=-1)])
        return torch.cat(parts, dim=-1)

    def position_embedding(self, anchor_boxes: torch.Tensor, size: int) -> torch.Tensor:
        """``[B,K,D]``: the sine embedding of each cell's mean box centre over APL_POSITION_SIDE
        (APL's code: 416 whatever the input size), or over the input side ``size`` (0)."""
        side = self.position_side or size
        return sine_position_embedding(anchor_boxes[..., :2].float().mean(dim=2) / side, self.hidden)

    def forward(self, anchors: torch.Tensor, images: torch.Tensor,
                anchor_boxes: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        position = tag = None
        if self.position:
            position = self.position_embedding(anchor_boxes, images.shape[-1]).to(anchors.dtype)
        if self.tag:
            tokens = self.tag_tokens(images, anchor_boxes)
            tag, _ = self.tag_encoder(tokens.flatten(0, 1))
            tag = tag.view(*tokens.shape[:2], -1).to(anchors.dtype)
        visual, tag_score = self.fuse(anchors, position, tag)
        return visual, visual if tag_score is None else visual + tag_score

    def fuse(self, anchors: torch.Tensor, position: torch.Tensor | None,
             tag: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The soft-weighted fusion of the anchors ``[B,K,D]`` with their position and tag embeddings
        (``[B,K,D]`` each, None when off): ``(visual, P_t(t))``, the second None without a tag."""
        prompts = [p for p in (position, tag) if p is not None]
        weights = self.soft_weights(anchors + sum(prompts)).softmax(dim=-1)
        visual = self.visual_proj(anchors * weights[..., :1])
        if position is not None:
            visual = visual + position * weights[..., 1:2]
        if tag is None:
            return visual, None
        return visual + self.tag_proj(tag * weights[..., -1:]), self.tag_proj(tag)


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
        rows = torch.arange(visual.shape[0], device=visual.device)
        best = visual[rows, self.anchor_index(visual, texts)]  # [E, B, D]
        return F.mse_loss(self.decoder(best), texts.transpose(0, 1).detach())

    @torch.no_grad()
    def anchor_index(self, visual: torch.Tensor, texts: torch.Tensor) -> torch.Tensor:
        """``[E,B]``: the index of the anchor that reconstructs each expression (see the class)."""
        texts = texts.transpose(0, 1)  # [E, B, D]
        if self.batch_sum:
            return torch.einsum("ebd,kd->ebk", texts, visual.sum(dim=0)).argmax(dim=-1)
        return torch.einsum("ebd,bkd->ebk", texts, visual).argmax(dim=-1)
