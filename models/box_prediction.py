"""Box prediction: each selected cell's box, the candidates an expression chooses among.

Shapes: B samples, K selected anchors; boxes in letterboxed pixels.
"""
from __future__ import annotations

import torch


def cell_boxes(anchor_boxes: torch.Tensor) -> torch.Tensor:
    """The most confident of each cell's 4 boxes: anchor_boxes ``[B,K,4,5+C]`` (cx, cy, w, h,
    objectness, ...) -> ``[B,K,5]`` (x1, y1, x2, y2, objectness)."""
    best = anchor_boxes[..., 4].argmax(dim=-1)  # [B, K]
    box = torch.take_along_dim(anchor_boxes, best[..., None, None], dim=2)[:, :, 0]  # [B, K, 5+C]
    x1 = box[..., 0] - box[..., 2] / 2
    y1 = box[..., 1] - box[..., 3] / 2
    return torch.stack([x1, y1, x1 + box[..., 2], y1 + box[..., 3], box[..., 4]], dim=-1)


def cell_box(anchor_boxes: torch.Tensor, cell: torch.Tensor) -> torch.Tensor:
    """The most confident of the 4 boxes of ``cell`` ``[B]`` (an index into K) as ``[B,1,5]``
    (x1, y1, x2, y2, objectness)."""
    rows = torch.arange(anchor_boxes.shape[0], device=anchor_boxes.device)
    return cell_boxes(anchor_boxes[rows, cell][:, None])
