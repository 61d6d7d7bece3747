"""The weakly supervised REC model: frozen detector anchors ranked against the expression."""
from __future__ import annotations

import numpy as np
import torch
from torch import nn

from .box_prediction import cell_boxes
from .cma import CrossModalityAttention
from .detector import YOLOv3
from .detector_cache import Detections
from .fusion import MultiScaleFusion
from .language_encoder import LanguageEncoder
from .loss import rec_loss


class REC(nn.Module):
    """``forward(images [B,3,S,S], refs [B,E,T], detections=None)``; ``detections``, what
    :meth:`detect` gives for ``images``, skips the detector (a :class:`DetectorCache` supplies them).

    Training: a dict with the scalar ``'loss'`` and its parts (``ce``, ``fns``, ``er``).
    Evaluation: ``[B,1,5]`` boxes (x1, y1, x2, y2, objectness) in letterboxed pixels, the
    best-ranked candidate (:meth:`rank`) for the first expression of each sample.
    """

    def __init__(self, cfg, pretrained_emb: np.ndarray | None, token_size: int):
        super().__init__()
        self.select_num = cfg.SELECT_NUM
        self.fns_weight = cfg.FNS_WEIGHT
        self.er_weight = cfg.ER_WEIGHT
        self.freeze_visual = cfg.VIS_FREEZE
        self.freeze_backbone_bn = cfg.FREEZE_BACKBONE_BN
        hidden = cfg.HIDDEN_SIZE

        self.visual_encoder = YOLOv3(cfg.CLASS_NUM, cfg.ANCHORS, cfg.ANCH_MASK, cfg.VIS_WIDTH, cfg.SPP_KERNELS,
                                     cfg.VIS_MIN_CHANNELS)
        if self.freeze_visual:
            self.visual_encoder.requires_grad_(False)
        s32, s16, s8 = self.visual_encoder.channels
        self.fusion = MultiScaleFusion((s8, s16, s32), hidden=s32)
        self.language_encoder = LanguageEncoder(
            token_size, cfg.WORD_EMBED_SIZE, hidden, cfg.N_SA, cfg.MULTI_HEAD, cfg.FF_SIZE, cfg.DROPOUT_R,
            pretrained_emb if cfg.USE_GLOVE else None, cfg.EMBED_FREEZE)
        self.anchor_proj = nn.Linear(s32, hidden)
        self.expr_proj = nn.Linear(hidden, hidden)
        self.cma = (CrossModalityAttention(s32, hidden, cfg.DROPOUT_R, cfg.CMA_ATTENTION)
                    if cfg.USE_CMA else None)
        self.cma_pairwise = cfg.CMA_CONDITION == "query"
        # Parameters the reference owns but never runs: kept for its checkpoints, and marked
        # untrainable so that DDP expects no gradient for them (the optimizer would skip them anyway).
        unused = [self.fusion.mid_proj, self.fusion.bot_proj] + ([self.anchor_proj] if self.cma else [])
        for module in unused:
            module.requires_grad_(False)

    def train(self, mode: bool = True) -> "REC":
        super().train(mode)
        if mode and self.freeze_backbone_bn:
            self.visual_encoder.eval()
        return self

    def forward(self, images: torch.Tensor, refs: torch.Tensor, detections: Detections | None = None):
        if not self.training:
            similarities, candidates = self.rank(images, refs, detections)
            best = similarities.argmax(dim=1)
            return candidates[torch.arange(candidates.shape[0], device=best.device), best][:, None]
        if images.shape[0] < 2:
            raise ValueError(f"training needs at least 2 samples per batch (got {images.shape[0]}): the "
                             "contrastive loss has no negatives otherwise; drop the last incomplete batch")
        anchors, texts, _ = self._embed(images, refs, detections, pairwise=self.cma_pairwise)
        return rec_loss(anchors, texts, self.fns_weight, self.er_weight)

    def rank(self, images: torch.Tensor, refs: torch.Tensor,
             detections: Detections | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Every candidate anchor scored against the first expression of each sample.

        Returns the anchor-text similarities ``[B,K]`` (dot products; their softmax over K is the
        probability of each candidate) and the candidates' boxes ``[B,K,5]`` (x1, y1, x2, y2,
        objectness: each selected cell's most confident box) in letterboxed pixels."""
        anchors, texts, anchor_boxes = self._embed(images, refs[:, :1], detections, pairwise=False)
        return torch.einsum("bkd,bd->bk", anchors, texts[:, 0]), cell_boxes(anchor_boxes)

    def _embed(self, images: torch.Tensor, refs: torch.Tensor, detections: Detections | None,
               pairwise: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Anchors ``[B,K,D]`` (``[B_text,B_image,K,D]`` when ``pairwise``), texts ``[B,E,D]`` and the
        selected cells' boxes ``[B,K,4,5+C]``."""
        b = images.shape[0]
        if refs.dim() != 3 or refs.shape[0] != b:
            raise ValueError(f"refs must be [B={b}, expressions, tokens], got {tuple(refs.shape)}")
        s32, s16, s8, boxes = detections if detections is not None else self.detect(images)
        top = self.fusion(s8, s16, s32)  # [B, C, h, w]

        pooled, _ = self.language_encoder(refs.flatten(0, 1))
        pooled = pooled.view(b, refs.shape[1], -1)  # [B, E, D]

        cells = self.select_cells(boxes)
        if self.cma is not None:
            # [B, K, D], or [B_text, B_image, K, D] when every image is conditioned on every expression
            anchors = self.cma.anchors(top, pooled[:, 0], cells, pairwise=pairwise)
        else:
            anchors = self.anchor_proj(_gather_cells(top.flatten(2).transpose(1, 2), cells))
        return anchors, self.expr_proj(pooled), _gather_cells(boxes, cells)

    def detect(self, images: torch.Tensor) -> Detections:
        """The detector's stride 32, 16 and 8 feature maps and its stride-32 boxes
        ``[B, H*W, 4, 5+C]`` (the only head the REC model ranks)."""
        with torch.set_grad_enabled(torch.is_grad_enabled() and not self.freeze_visual):
            (s32, s16, s8), (boxes, _, _) = self.visual_encoder(images, heads=(0,))
        return s32, s16, s8, boxes

    def select_cells(self, boxes: torch.Tensor) -> torch.Tensor:
        """The K cells whose 4 anchors are most confident on average, in grid order: ``[B, K]``."""
        return boxes[..., 4].mean(-1).topk(self.select_num, dim=1).indices.sort(dim=1).values

    @torch.no_grad()
    def candidate_boxes(self, images: torch.Tensor, detections: Detections | None = None) -> torch.Tensor:
        """The boxes of the selected cells, ``[B, K, 4, 5+C]`` (cx, cy, w, h, objectness, classes):
        what the expression chooses among (text-blind baselines start from here)."""
        boxes = (detections if detections is not None else self.detect(images))[3]
        return _gather_cells(boxes, self.select_cells(boxes))


def _gather_cells(x: torch.Tensor, cells: torch.Tensor) -> torch.Tensor:
    """x ``[B, N, ...]``, cells ``[B, K]`` -> ``[B, K, ...]``."""
    return x[torch.arange(x.shape[0], device=x.device)[:, None], cells]
