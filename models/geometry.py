"""Where an anchor is and how large: an embedding of its box added to the anchor's visual one
(ANCHOR_GEOMETRY, beyond the published methods).

The anchors are grid cells of a convolutional map: their features say what is there, and only
faintly where it is or how large it is. Position and size words ("the circle on the left", "the
big one") need both, so the box the cell predicts, as fractions of the input side, is embedded
and added to the anchor.
"""
from __future__ import annotations

import torch
from torch import nn
from torchvision.ops import box_convert


class AnchorGeometry(nn.Module):
    """``boxes [..., K, 4+]`` (x1, y1, x2, y2 in input pixels, further columns ignored) ->
    ``[..., K, D]``: an MLP of (cx, cy, w, h) / input side. The last layer starts at zero, so a
    model with it starts as the one without."""

    def __init__(self, width: int):
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(4, width), nn.ReLU(inplace=True), nn.Linear(width, width))
        nn.init.zeros_(self.mlp[2].weight)
        nn.init.zeros_(self.mlp[2].bias)

    def forward(self, boxes: torch.Tensor, side: int) -> torch.Tensor:
        geometry = box_convert(boxes[..., :4].float(), "xyxy", "cxcywh") / side
        return self.mlp(geometry.to(self.mlp[0].weight.dtype))
