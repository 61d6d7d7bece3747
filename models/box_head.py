"""Anchor-free box head on one feature map: one box per cell, SimOTA-style assignment, its losses.

Shapes: B samples with one target box each; a map of H x W cells of ``stride`` pixels on an S x S
input. Per cell the head regresses ``(tx, ty, tw, th)`` and an objectness logit; the box is
``cx = (tx + j) * stride``, ``cy = (ty + i) * stride``, ``w = exp(tw) * stride``,
``h = exp(th) * stride`` for the cell in row i, column j (YOLOX's decoding, which SimREC uses).
Objectness says whether the cell holds *the* box: at test time the most confident cell's box is
the answer, so nothing is ranked but the cells themselves.

Training picks the positive cells of each sample SimOTA's way (YOLOX, SimREC): candidates are the
cells whose centre lies inside the target box or within ``center_radius`` strides of its centre;
each candidate costs ``iou_cost * -log(IoU) + obj_cost * BCE(objectness, 1)`` (plus a large
penalty unless it is both inside the box and near its centre), and the ``k`` cheapest are
positive, ``k`` being the sum of the candidates' ten best IoUs (at least 1). One target per
sample means no cell is claimed twice, so the assignment is a few batched tensor operations.
"""
from __future__ import annotations

import math
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn
from torchvision.ops import box_convert, generalized_box_iou_loss

from .blocks import ConvBNAct

IOU_LOSSES = ("iou", "giou")
_TOP_IOUS = 10  # candidates whose IoUs sum to the dynamic k (YOLOX's and SimREC's value)
_OUTSIDE_PENALTY = 1e5  # cost of a candidate that is not both in the box and near its centre
_MAX_LOG_SIZE = 8.0  # exp(8) strides: bounds a wild early size prediction, so that IoUs stay finite
_OBJ_PRIOR = 0.01  # initial objectness probability of every cell (YOLOX's bias initialisation)


def aligned_iou(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """IoU of corresponding x1, y1, x2, y2 boxes: ``[..., 4]`` and ``[..., 4]`` -> ``[...]``."""
    wh = (torch.min(a[..., 2:], b[..., 2:]) - torch.max(a[..., :2], b[..., :2])).clamp(min=0)
    inter = wh[..., 0] * wh[..., 1]
    area_a = (a[..., 2] - a[..., 0]) * (a[..., 3] - a[..., 1])
    area_b = (b[..., 2] - b[..., 0]) * (b[..., 3] - b[..., 1])
    return inter / (area_a + area_b - inter).clamp(min=1e-9)


class BoxHead(nn.Module):
    """``forward(features [B,C,H,W]) -> raw [B,H,W,5]`` (tx, ty, tw, th, objectness logit);
    ``loss(raw, targets [B,4])`` with targets cx, cy, w, h divided by the input size;
    ``decode(raw) -> [B,1,5]`` (x1, y1, x2, y2 in input pixels, objectness) of the best cell.

    A 1x1 stem to ``channels``, two 3x3 convolutions, then 1x1 predictions of the 4 box numbers
    and the objectness (SimREC's regression branch; its class branch has nothing to predict here).
    ``activation`` is the convolutions' (``'leaky'`` or SimREC's ``'silu'``); the objectness bias
    starts at the logit of ``obj_prior`` (YOLOX's 0.01), or at PyTorch's default with 0.

    Loss: ``iou_weight * IoU loss + objectness BCE + l1_weight * L1``, each summed over cells and
    divided by the number of positive cells. The IoU loss is ``1 - IoU^2`` (``'iou'``, SimREC's and
    YOLOX's) or ``1 - GIoU`` (``'giou'``); the objectness BCE covers every cell (target 1 on the
    positives); L1 compares the positives' raw regression with the target's (YOLOX adds it for its
    last epochs; SimREC leaves it off: ``l1_weight`` 0).
    """

    def __init__(self, in_channels: int, channels: int = 256, stride: int = 32, iou_loss: str = "iou",
                 iou_weight: float = 5.0, l1_weight: float = 1.0, iou_cost: float = 3.0, obj_cost: float = 1.0,
                 center_radius: float = 2.5, activation: str = "leaky", obj_prior: float = _OBJ_PRIOR):
        super().__init__()
        if iou_loss not in IOU_LOSSES:
            raise ValueError(f"iou_loss must be one of {IOU_LOSSES}, got {iou_loss!r}")
        self.stride = stride
        self.iou_loss = iou_loss
        self.iou_weight, self.l1_weight = iou_weight, l1_weight
        self.iou_cost, self.obj_cost = iou_cost, obj_cost
        self.center_radius = center_radius
        self.stem = ConvBNAct(in_channels, channels, 1, activation=activation)
        self.convs = nn.Sequential(ConvBNAct(channels, channels, 3, activation=activation),
                                   ConvBNAct(channels, channels, 3, activation=activation))
        self.reg = nn.Conv2d(channels, 4, 1)
        self.obj = nn.Conv2d(channels, 1, 1)
        if obj_prior:  # 0 keeps PyTorch's default bias initialisation
            nn.init.constant_(self.obj.bias, -math.log((1 - obj_prior) / obj_prior))

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        x = self.convs(self.stem(features))
        return torch.cat([self.reg(x), self.obj(x)], dim=1).permute(0, 2, 3, 1)

    def cell_offsets(self, raw: torch.Tensor) -> torch.Tensor:
        """``[H*W, 2]`` (column, row) of each cell, in ``raw``'s row-major cell order."""
        h, w = raw.shape[1:3]
        rows, cols = torch.meshgrid(torch.arange(h, device=raw.device), torch.arange(w, device=raw.device),
                                    indexing="ij")
        return torch.stack([cols, rows], dim=-1).view(-1, 2).to(raw.dtype)

    def boxes(self, raw: torch.Tensor) -> torch.Tensor:
        """Every cell's box, ``[B, H*W, 4]`` cx, cy, w, h in input pixels."""
        reg = raw[..., :4].flatten(1, 2)
        centre = (reg[..., :2] + self.cell_offsets(raw)) * self.stride
        size = reg[..., 2:].clamp(max=_MAX_LOG_SIZE).exp() * self.stride
        return torch.cat([centre, size], dim=-1)

    @torch.no_grad()
    def assign(self, boxes: torch.Tensor, objectness: torch.Tensor, target: torch.Tensor,
               centres: torch.Tensor) -> torch.Tensor:
        """Positive cells ``[B, N]`` (bool) for predicted boxes ``[B,N,4]`` (cx, cy, w, h), objectness
        logits ``[B,N]``, one target ``[B,4]`` (cx, cy, w, h) per sample and the cell centres ``[N,2]``,
        all in input pixels."""
        half = target[:, None, 2:] / 2
        offset = centres[None] - target[:, None, :2]  # [B, N, 2]
        in_box = (offset.abs() < half).all(dim=-1)
        near_centre = (offset.abs() < self.center_radius * self.stride).all(dim=-1)
        candidate = in_box | near_centre
        iou = aligned_iou(box_convert(boxes, "cxcywh", "xyxy"),
                          box_convert(target, "cxcywh", "xyxy")[:, None].expand_as(boxes))
        obj_cost = F.binary_cross_entropy_with_logits(objectness, torch.ones_like(objectness), reduction="none")
        cost = (self.iou_cost * -torch.log(iou + 1e-8) + self.obj_cost * obj_cost
                + _OUTSIDE_PENALTY * ~(in_box & near_centre))
        cost = cost.masked_fill(~candidate, math.inf)
        top = min(_TOP_IOUS, iou.shape[1])
        k = (iou * candidate).topk(top, dim=1).values.sum(dim=1).int().clamp(min=1)
        rank = cost.argsort(dim=1).argsort(dim=1)
        return (rank < k[:, None]) & candidate

    def loss(self, raw: torch.Tensor, targets: torch.Tensor,
             weights: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """``{'loss', 'iou', 'obj', 'l1'}`` for raw outputs ``[B,H,W,5]`` and targets ``[B,4]``
        (cx, cy, w, h divided by the input size), the parts unweighted. ``weights`` ``[B]`` scale
        each sample's terms (all three: a doubtful target misleads the objectness as much as the
        box); the normalisation by the positive cells stays."""
        raw = raw.float()
        h, w = raw.shape[1:3]
        scale = raw.new_tensor([w, h, w, h]) * self.stride
        target = targets.float() * scale  # [B, 4] input pixels
        boxes = self.boxes(raw)
        objectness = raw[..., 4].flatten(1)
        cells = self.cell_offsets(raw)
        positive = self.assign(boxes.detach(), objectness.detach(), target, (cells + 0.5) * self.stride)
        count = positive.sum().clamp(min=1)

        target_boxes = target[:, None].expand_as(boxes)
        if self.iou_loss == "iou":
            iou = aligned_iou(box_convert(boxes, "cxcywh", "xyxy"), box_convert(target_boxes, "cxcywh", "xyxy"))
            box_loss = 1 - iou ** 2
        else:
            box_loss = generalized_box_iou_loss(box_convert(boxes, "cxcywh", "xyxy"),
                                                box_convert(target_boxes, "cxcywh", "xyxy"))
        raw_target = torch.cat([target[:, None, :2] / self.stride - cells,
                                torch.log(target[:, None, 2:] / self.stride + 1e-8).expand(-1, cells.shape[0], -1)],
                               dim=-1)
        l1 = (raw[..., :4].flatten(1, 2) - raw_target).abs().sum(dim=-1)
        if weights is None:
            box_loss = torch.where(positive, box_loss, 0).sum() / count
            obj_loss = F.binary_cross_entropy_with_logits(objectness, positive.float(), reduction="sum") / count
            l1 = torch.where(positive, l1, 0).sum() / count
        else:
            w = weights.float()[:, None]
            box_loss = (torch.where(positive, box_loss, 0) * w).sum() / count
            obj_loss = (F.binary_cross_entropy_with_logits(objectness, positive.float(), reduction="none")
                        * w).sum() / count
            l1 = (torch.where(positive, l1, 0) * w).sum() / count
        total = self.iou_weight * box_loss + obj_loss + self.l1_weight * l1
        return {"loss": total, "iou": box_loss, "obj": obj_loss, "l1": l1}

    def decode(self, raw: torch.Tensor,
               choose: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None) -> torch.Tensor:
        """The most confident cell's box, or the one ``choose(logits [B,K], boxes [B,K,4])`` picks from
        the K cells' objectness logits and boxes (x1, y1, x2, y2): ``[B,1,5]`` x1, y1, x2, y2 (input
        pixels), objectness."""
        boxes = box_convert(self.boxes(raw.float()), "cxcywh", "xyxy")
        logits = raw[..., 4].flatten(1).float()
        scores = logits.sigmoid()
        best = scores.argmax(dim=1) if choose is None else choose(logits, boxes)
        rows = torch.arange(raw.shape[0], device=raw.device)
        return torch.cat([boxes[rows, best], scores[rows, best, None]], dim=1)[:, None]
