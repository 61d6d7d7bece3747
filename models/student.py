"""The supervised one-stage REC model (SimREC-style) that RefCLIP trains on its pseudo-labels.

The weak model's trunk (the YOLOv3 detector, whose weight files load into it), language encoder and
multi-scale fusion, with the expression guiding the fusion: it gates each of the three detector maps
before they are fused, then collects and diffuses language-selected context over the fused map. An
anchor-free box head regresses one box per expression from the fused map; no anchor is ranked.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np
import torch
from torch import nn

from .blocks import ConvBNAct
from .box_head import BoxHead
from .fusion import MultiScaleFusion
from .language_encoder import LanguageEncoder
from .position_words import build_position_words
from .detector import HEAD_STRIDES, YOLOv3


class LanguageGate(nn.Module):
    """SimREC's simple fusion: ``act(BN(proj(map) * proj(expression)))``, a map ``[B,C,H,W]`` gated
    channel by channel by the expression ``[B,D]``. (SimREC's expression projection carries a
    BatchNorm too; without it a batch of one trains.)"""

    def __init__(self, channels: int, text_dim: int):
        super().__init__()
        self.visual = ConvBNAct(channels, channels, 1)
        self.text = nn.Sequential(nn.Linear(text_dim, channels), nn.LeakyReLU(0.1))
        self.norm = nn.Sequential(nn.BatchNorm2d(channels), nn.LeakyReLU(0.1, inplace=True))

    def forward(self, x: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
        return self.norm(self.visual(x) * self.text(text)[:, :, None, None])


class CollectDiffuseAttention(nn.Module):
    """SimREC's language-guided global context (from GARAN): per head, the expression collects one
    vector from the map (softmax over positions), which is diffused back to every position scaled by
    a sigmoid of that position's match with the expression; then a 1x1 convolution, BatchNorm, a
    residual connection and the activation. ``[B,C,H,W]``, ``[B,D]`` -> ``[B,C,H,W]``."""

    def __init__(self, channels: int, text_dim: int, heads: int = 2):
        super().__init__()
        if channels % heads:
            raise ValueError(f"{channels} channels do not split into {heads} heads")
        self.heads = heads
        self.query = nn.Linear(text_dim, channels)
        self.collect_key = nn.Conv2d(channels, channels, 1)
        self.diffuse_key = nn.Conv2d(channels, channels, 1)
        self.value = nn.Conv2d(channels, channels, 1)
        self.out = nn.Conv2d(channels, channels, 1)
        self.norm = nn.BatchNorm2d(channels)
        self.act = nn.LeakyReLU(0.1, inplace=True)

    def forward(self, x: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        d = c // self.heads

        def split(y: torch.Tensor) -> torch.Tensor:  # [B,C,H,W] -> [B,heads,d,H*W]
            return y.view(b, self.heads, d, h * w)

        query = self.query(text).view(b, self.heads, 1, d) / d ** 0.5
        collect = (query @ split(self.collect_key(x))).softmax(dim=-1)  # [B, heads, 1, H*W]
        gathered = split(self.value(x)) @ collect.transpose(-1, -2)  # [B, heads, d, 1]
        diffuse = (query @ split(self.diffuse_key(x))).sigmoid()  # [B, heads, 1, H*W]
        context = (gathered * diffuse).view(b, c, h, w)
        return self.act(self.norm(self.out(context)) + x)


class Student(nn.Module):
    """``forward(images [B,3,S,S], refs [B,E,T], detections=None, targets=None)``; only each
    sample's first expression is read (in training the dataset puts a randomly drawn one first).
    ``detections``, what :meth:`detect` gives for ``images``, skips the trunk (a
    :class:`DetectorCache` supplies them when the trunk is frozen).

    Training (``targets`` ``[B,1,4]``: cx, cy, w, h divided by S; optional ``weights`` ``[B]``, each
    sample's loss weight): a dict with the scalar ``'loss'`` and its parts (``iou``, ``obj``, ``l1``,
    see :class:`BoxHead`).
    Evaluation: ``[B,1,5]`` boxes (x1, y1, x2, y2, objectness) in letterboxed pixels: the most
    confident cell's (with POSITION_WORDS, :class:`PositionWords` decides between the plausible ones).
    """

    supervised = True

    def __init__(self, cfg, pretrained_emb: np.ndarray | None, token_size: int,
                 vocab: Sequence[str] | None = None):
        super().__init__()
        self.freeze_visual = cfg.VIS_FREEZE
        self.freeze_backbone_bn = cfg.FREEZE_BACKBONE_BN
        hidden = cfg.HIDDEN_SIZE

        self.visual_encoder = YOLOv3(cfg.CLASS_NUM, cfg.ANCHORS, cfg.ANCH_MASK, cfg.VIS_WIDTH, cfg.SPP_KERNELS,
                                     cfg.VIS_MIN_CHANNELS)
        # The detection heads stay so that the detector's weight files load as they are; nothing runs them.
        for head in self.visual_encoder.heads:
            head.requires_grad_(False)
        if self.freeze_visual:
            self.visual_encoder.requires_grad_(False)
        s32, s16, s8 = self.visual_encoder.channels
        self.language_encoder = LanguageEncoder(
            token_size, cfg.WORD_EMBED_SIZE, hidden, cfg.N_SA, cfg.MULTI_HEAD, cfg.FF_SIZE, cfg.DROPOUT_R,
            pretrained_emb if cfg.USE_GLOVE else None, cfg.EMBED_FREEZE)
        self.gates = nn.ModuleList(LanguageGate(ch, hidden) for ch in (s8, s16, s32))
        self.fusion = MultiScaleFusion((s8, s16, s32), hidden=s32)
        # Only the fused stride-32 map is read: the fusion's two other projections never run.
        for module in (self.fusion.mid_proj, self.fusion.bot_proj):
            module.requires_grad_(False)
        self.attention = CollectDiffuseAttention(s32, hidden)
        self.position_words = build_position_words(cfg, vocab)
        self.box_head = BoxHead(s32, cfg.BOX_HEAD_CHANNELS, HEAD_STRIDES[0], cfg.BOX_IOU_LOSS, cfg.BOX_IOU_WEIGHT,
                                cfg.BOX_L1_WEIGHT, obj_cost=cfg.BOX_OBJ_COST, center_radius=cfg.BOX_CENTER_RADIUS,
                                activation=cfg.BOX_ACTIVATION)

    def train(self, mode: bool = True) -> "Student":
        super().train(mode)
        if mode and self.freeze_backbone_bn:
            self.visual_encoder.eval()
        return self

    def forward(self, images: torch.Tensor, refs: torch.Tensor, detections: tuple | None = None,
                targets: torch.Tensor | None = None, weights: torch.Tensor | None = None):
        b = images.shape[0]
        if refs.dim() != 3 or refs.shape[0] != b:
            raise ValueError(f"refs must be [B={b}, expressions, tokens], got {tuple(refs.shape)}")
        s32, s16, s8 = detections if detections is not None else self.detect(images)
        text, _ = self.language_encoder(refs[:, 0])  # [B, D]
        s8, s16, s32 = (gate(x, text) for gate, x in zip(self.gates, (s8, s16, s32)))
        fused = self.attention(self.fusion(s8, s16, s32), text)
        raw = self.box_head(fused)
        if not self.training:
            if self.position_words is None:
                return self.box_head.decode(raw)
            return self.box_head.decode(raw, lambda logits, boxes: self.position_words.choose(logits, boxes,
                                                                                               refs[:, 0]))
        if targets is None or targets.shape != (b, 1, 4):
            shape = None if targets is None else tuple(targets.shape)
            raise ValueError(f"the student learns from boxes: training needs targets [B={b}, 1, 4], got {shape}")
        return self.box_head.loss(raw, targets[:, 0], weights)

    def detect(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The trunk's stride 32, 16 and 8 feature maps (the detection heads' inputs)."""
        with torch.set_grad_enabled(torch.is_grad_enabled() and not self.freeze_visual):
            (s32, s16, s8), _ = self.visual_encoder(images, heads=())
        return s32, s16, s8
