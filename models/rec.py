"""The weakly supervised REC model: frozen detector anchors ranked against the expression."""
from __future__ import annotations

from typing import NamedTuple, Sequence

import numpy as np
import torch
from torch import nn

from .alignment import VisualAlignment
from .apl import AnchorPrompts, TextReconstruction
from .box_prediction import cell_boxes
from .cma import CrossModalityAttention
from .detector import YOLOv3
from .detector_cache import Detections
from .fusion import MultiScaleFusion
from .geometry import AnchorGeometry
from .language_encoder import LanguageEncoder
from .loss import own_image, rec_loss
from .position_words import build_position_words


class REC(nn.Module):
    """``forward(images [B,3,S,S], refs [B,E,T], detections=None, image_ids=None)``; ``detections``,
    what :meth:`detect` gives for ``images``, skips the detector (a :class:`DetectorCache` supplies
    them); ``image_ids`` ``[B]`` tell the training loss which samples share an image (GROUP_BY_IMAGE).

    Training: a dict with the scalar ``'loss'`` and its parts (``ce``, ``fns``, ``er``, ``referent``,
    ``agreement``; APL's ``recon``, ``align``, ``align_iou``, ``align_obj``, ``align_l1``).
    Evaluation: ``[B,1,5]`` boxes (x1, y1, x2, y2, objectness) in letterboxed pixels, the
    best-ranked candidate (:meth:`rank`) for the first expression of each sample (with
    POSITION_WORDS, :class:`PositionWords` decides between the plausible ones; with APL's alignment
    head and APL_ALIGN_PREDICT, the head's most confident box).
    """

    def __init__(self, cfg, pretrained_emb: np.ndarray | None, token_size: int,
                 vocab: Sequence[str] | None = None):
        super().__init__()
        self.select_num = cfg.SELECT_NUM
        self.fns_weight = cfg.FNS_WEIGHT
        self.er_weight = cfg.ER_WEIGHT
        self.referent_weight = cfg.REFERENT_WEIGHT
        self.agreement_weight = cfg.AGREEMENT_WEIGHT
        self.groups_by_image = cfg.GROUP_BY_IMAGE
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
        self.geometry = AnchorGeometry(hidden) if cfg.ANCHOR_GEOMETRY else None
        self.position_words = build_position_words(cfg, vocab)
        # APL (models/apl.py, models/alignment.py): prompts fused into the anchor embeddings, a
        # reconstruction loss, a box head trained on the model's own answers.
        self.prompts = None
        if cfg.APL_POSITION_PROMPT or cfg.APL_COLOUR_PROMPT or cfg.APL_CATEGORY_PROMPT:
            if vocab is None and (cfg.APL_COLOUR_PROMPT or cfg.APL_CATEGORY_PROMPT):
                raise ValueError("APL's colour and category prompts need the vocabulary (build_model(..., vocab=))")
            self.prompts = AnchorPrompts(cfg, vocab or (), pretrained_emb, token_size)
        self.recon_weight = cfg.APL_RECON_WEIGHT
        self.reconstruction = TextReconstruction(hidden, cfg.APL_RECON_ANCHOR) if self.recon_weight else None
        self.alignment = (VisualAlignment(s32, hidden, cfg.APL_ALIGN_BURN_IN, cfg.APL_BURN_IN_COUNT,
                                          cfg.APL_HEAD_OBJ_PRIOR) if cfg.APL_ALIGNMENT else None)
        self.align_predict = cfg.APL_ALIGN_PREDICT
        self.scatter_by_score = cfg.APL_SCATTER_ORDER == "score"
        # Parameters the reference owns but never runs: kept for its checkpoints, and marked
        # untrainable so that DDP expects no gradient for them (the optimizer would skip them anyway).
        unused = (([self.fusion.mid_proj, self.fusion.bot_proj] if self.alignment is None else [])
                  + ([self.anchor_proj] if self.cma else []))
        for module in unused:
            module.requires_grad_(False)

    def train(self, mode: bool = True) -> "REC":
        super().train(mode)
        if mode and self.freeze_backbone_bn:
            self.visual_encoder.eval()
        return self

    def forward(self, images: torch.Tensor, refs: torch.Tensor, detections: Detections | None = None,
                image_ids: torch.Tensor | None = None):
        if self.alignment is not None:
            self.alignment.count_forward(self.training)
        if not self.training:
            if not self.ranks_anchors:
                return self.alignment.decode(self._align(self._embed(images, refs[:, :1], detections, False)))
            similarities, candidates = self.rank(images, refs, detections)
            best = (similarities.argmax(dim=1) if self.position_words is None
                    else self.position_words.choose(similarities, candidates, refs[:, 0]))
            return candidates[torch.arange(candidates.shape[0], device=best.device), best][:, None]
        if images.shape[0] < 2:
            raise ValueError(f"training needs at least 2 samples per batch (got {images.shape[0]}): the "
                             "contrastive loss has no negatives otherwise; drop the last incomplete batch")
        embedded = self._embed(images, refs, detections, pairwise=self.cma_pairwise)
        out = rec_loss(embedded.anchors, embedded.texts, self.fns_weight, self.er_weight,
                       image_ids if self.groups_by_image else None, self.referent_weight,
                       self.agreement_weight)
        if self.reconstruction is not None:
            out["recon"] = self.reconstruction(own_image(embedded.visual), embedded.texts)
            out["loss"] = out["loss"] + self.recon_weight * out["recon"]
        if self.alignment is not None:
            gated, parts = self.alignment.loss(self._align(embedded), own_image(embedded.anchors),
                                               embedded.texts[:, 0], embedded.anchor_boxes, images.shape[-1])
            out["loss"] = out["loss"] + gated
            out.update(parts)
        return out

    @property
    def ranks_anchors(self) -> bool:
        """Whether the evaluation answer is the best-ranked candidate (:meth:`rank`); not when APL's
        alignment head answers (APL_ALIGN_PREDICT)."""
        return self.alignment is None or not self.align_predict

    def rank(self, images: torch.Tensor, refs: torch.Tensor,
             detections: Detections | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Every candidate anchor scored against the first expression of each sample.

        Returns the anchor-text similarities ``[B,K]`` (dot products; their softmax over K is the
        probability of each candidate) and the candidates' boxes ``[B,K,5]`` (x1, y1, x2, y2,
        objectness: each selected cell's most confident box) in letterboxed pixels."""
        embedded = self._embed(images, refs[:, :1], detections, pairwise=False)
        return (torch.einsum("bkd,bd->bk", embedded.anchors, embedded.texts[:, 0]),
                cell_boxes(embedded.anchor_boxes))

    def _embed(self, images: torch.Tensor, refs: torch.Tensor, detections: Detections | None,
               pairwise: bool) -> "Embedding":
        """The anchors and expressions embedded (see :class:`Embedding`)."""
        b = images.shape[0]
        if refs.dim() != 3 or refs.shape[0] != b:
            raise ValueError(f"refs must be [B={b}, expressions, tokens], got {tuple(refs.shape)}")
        s32, s16, s8, boxes = detections if detections is not None else self.detect(images)
        maps = self.fusion(s8, s16, s32, all_scales=self.alignment is not None)
        top = maps[-1] if self.alignment is not None else maps  # [B, C, h, w]

        pooled, _ = self.language_encoder(refs.flatten(0, 1))
        pooled = pooled.view(b, refs.shape[1], -1)  # [B, E, D]

        ranked = self.ranked_cells(boxes)
        cells = ranked.sort(dim=1).values
        if self.cma is not None:
            # [B, K, D], or [B_text, B_image, K, D] when every image is conditioned on every expression
            anchors = self.cma.anchors(top, pooled[:, 0], cells, pairwise=pairwise)
        else:
            anchors = self.anchor_proj(_gather_cells(top.flatten(2).transpose(1, 2), cells))
        anchor_boxes = _gather_cells(boxes, cells)
        if self.geometry is not None:
            anchors = anchors + self.geometry(cell_boxes(anchor_boxes), images.shape[-1])
        visual = anchors
        if self.prompts is not None:
            visual, anchors = self.prompts(anchors, images, anchor_boxes)
        return Embedding(anchors, self.expr_proj(pooled), anchor_boxes, visual, pooled, maps, cells, ranked)

    def _align(self, embedded: "Embedding") -> torch.Tensor:
        """APL's alignment head on the first expression: its raw output ``[B,h,w,5]``. APL's code
        writes the anchors, held in grid order, into the cells in score order (APL_SCATTER_ORDER
        'score'), so most cells receive another cell's anchor."""
        cells = embedded.ranked_cells if self.scatter_by_score else embedded.cells
        return self.alignment(embedded.maps, own_image(embedded.visual), cells, embedded.pooled[:, 0])

    def detect(self, images: torch.Tensor) -> Detections:
        """The detector's stride 32, 16 and 8 feature maps and its stride-32 boxes
        ``[B, H*W, 4, 5+C]`` (the only head the REC model ranks)."""
        with torch.set_grad_enabled(torch.is_grad_enabled() and not self.freeze_visual):
            (s32, s16, s8), (boxes, _, _) = self.visual_encoder(images, heads=(0,))
        return s32, s16, s8, boxes

    def ranked_cells(self, boxes: torch.Tensor) -> torch.Tensor:
        """The K cells whose 4 anchors are most confident on average, most confident first: ``[B, K]``."""
        return rank_cells(boxes, self.select_num)

    def select_cells(self, boxes: torch.Tensor) -> torch.Tensor:
        """The K cells of :meth:`ranked_cells` in grid order (the order of every per-anchor tensor)."""
        return self.ranked_cells(boxes).sort(dim=1).values

    @torch.no_grad()
    def candidate_boxes(self, images: torch.Tensor, detections: Detections | None = None) -> torch.Tensor:
        """The boxes of the selected cells, ``[B, K, 4, 5+C]`` (cx, cy, w, h, objectness, classes):
        what the expression chooses among (text-blind baselines start from here)."""
        boxes = (detections if detections is not None else self.detect(images))[3]
        return _gather_cells(boxes, self.select_cells(boxes))


class Embedding(NamedTuple):
    """What :meth:`REC._embed` computes. ``anchors`` ``[B,K,D]`` (``[B_text,B_image,K,D]`` when
    conditioned per expression) are what the expressions ``texts`` ``[B,E,D]`` are scored against;
    ``visual`` the same before APL's tag score is added (``anchors`` itself without prompts);
    ``anchor_boxes`` ``[B,K,4,5+C]`` the selected ``cells``' ``[B,K]`` boxes; ``pooled`` ``[B,E,D]``
    the language encoder's output; ``maps`` the fused stride-32 map, or with APL's alignment the
    fused stride 8, 16 and 32 maps; ``ranked_cells`` the same cells most confident first."""
    anchors: torch.Tensor
    texts: torch.Tensor
    anchor_boxes: torch.Tensor
    visual: torch.Tensor
    pooled: torch.Tensor
    maps: torch.Tensor | tuple[torch.Tensor, torch.Tensor, torch.Tensor]
    cells: torch.Tensor
    ranked_cells: torch.Tensor


def rank_cells(boxes: torch.Tensor, k: int) -> torch.Tensor:
    """Boxes ``[B, cells, 4, 5+C]`` -> the ``k`` cells whose 4 boxes have the highest mean objectness,
    most confident first: ``[B, k]``."""
    return boxes[..., 4].mean(-1).topk(k, dim=1).indices


def _gather_cells(x: torch.Tensor, cells: torch.Tensor) -> torch.Tensor:
    """x ``[B, N, ...]``, cells ``[B, K]`` -> ``[B, K, ...]``."""
    return x[torch.arange(x.shape[0], device=x.device)[:, None], cells]
