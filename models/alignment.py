"""APL's visual alignment: a supervised box head on language-fused features, trained online on the
weak model's own best-anchor boxes (APL_ALIGNMENT).

The prompted anchor embeddings are written back into their cells of the fused stride-32 map; the
three fused maps are each gated by the expression (SimREC's simple fusion), fused across scales
again, attended by the expression (SimREC's collect-diffuse attention) and given to the anchor-free
box head of ``models/box_head.py`` (the gate, the attention and the head are the student's,
``models/student.py``). The expression's features are detached, as in APL: the head trains the
visual side only.

Shapes: B images, K selected anchors, D = HIDDEN_SIZE, C the fused maps' channels.
"""
from __future__ import annotations

import torch
from torch import nn

from .box_head import BoxHead
from .fusion import MultiScaleFusion
from .box_prediction import cell_box
from .student import CollectDiffuseAttention, LanguageGate

_HEAD_WIDTH_RATIO = 2  # box head channels = HIDDEN_SIZE / 2: APL's 256 at HIDDEN_SIZE 512


class VisualAlignment(nn.Module):
    """``forward(maps, visual, cells, language)`` -> the box head's raw output ``[B,h,w,5]``.

    maps: the fused stride 8, 16 and 32 maps ``[B,C,*,*]``; visual ``[B,K,D]`` the prompted anchor
    embeddings (rows in grid order), written into ``cells`` ``[B,K]`` (indices into the stride-32
    grid: the selected cells in grid order, or in APL's code's score order, APL_SCATTER_ORDER); language ``[B,D]``
    the expression's pooled features. ``decode`` gives the box head's answer ``[B,1,5]``.
    """

    def __init__(self, channels: int, hidden: int, burn_in: int = 0, burn_in_count: str = "every_forward",
                 obj_prior: float = 0.0):
        super().__init__()
        self.burn_in = burn_in
        self.counts_every_forward = burn_in_count == "every_forward"
        # Forwards counted for the burn-in (see count_forward): a buffer, saved with the weights, so
        # that --resume keeps the burn-in.
        self.register_buffer("steps", torch.zeros((), dtype=torch.long))
        self.anchor_proj = nn.Linear(hidden, channels)
        self.gates = nn.ModuleList(LanguageGate(channels, hidden) for _ in range(3))
        self.multi_scale = MultiScaleFusion((channels, channels, channels), hidden, side_outputs=False)
        self.attention = CollectDiffuseAttention(hidden, hidden)
        # SimREC's head as APL configures it: SiLU, IoU loss weight 5, no L1, assignment cost 3 x IoU
        # cost; APL never calls its bias initialisation (obj_prior 0).
        self.head = BoxHead(hidden, hidden // _HEAD_WIDTH_RATIO, stride=32, iou_loss="iou", iou_weight=5.0,
                            l1_weight=0.0, iou_cost=3.0, obj_cost=0.0, activation="silu", obj_prior=obj_prior)

    def forward(self, maps: tuple[torch.Tensor, torch.Tensor, torch.Tensor], visual: torch.Tensor,
                cells: torch.Tensor, language: torch.Tensor) -> torch.Tensor:
        s8, s16, s32 = maps
        s32 = write_anchors(s32, self.anchor_proj(visual), cells)
        language = language.detach()
        gated = [gate(x, language) for gate, x in zip(self.gates, (s8, s16, s32))]
        return self.head(self.attention(self.multi_scale(*gated), language))

    def count_forward(self, training: bool) -> None:
        """Called at every forward of the model. APL_BURN_IN_COUNT 'every_forward' (APL's code) counts
        them all, evaluation included; 'training_steps' counts training forwards only."""
        if training or self.counts_every_forward:
            self.steps += 1

    def burn_in_over(self) -> torch.Tensor:
        """Whether the alignment loss counts: from the ``burn_in``-th counted forward on (APL's
        ``iter >= BURN_IN``), or after ``burn_in`` training steps."""
        return self.steps >= self.burn_in if self.counts_every_forward else self.steps > self.burn_in

    def loss(self, raw: torch.Tensor, anchors: torch.Tensor, text: torch.Tensor, anchor_boxes: torch.Tensor,
             size: int) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The box head's loss on the weak model's own answer: for anchors ``[B,K,D]`` (as scored),
        the first expressions ``[B,D]`` and the anchors' boxes ``[B,K,4,5+C]``, the most confident box
        of each image's best anchor. Returns it weighted 1 once the burn-in is over and 0 before
        (computed all the same, so that every parameter gets a gradient each step, as DDP needs),
        and its parts (``align``, ``align_iou``, ``align_obj``, ``align_l1``)."""
        with torch.no_grad():
            best = torch.einsum("bkd,bd->bk", anchors, text).argmax(dim=1)
            targets = box_targets(cell_box(anchor_boxes.float(), best), size)
        parts = self.head.loss(raw, targets)
        gate = self.burn_in_over().to(parts["loss"].dtype)
        return parts["loss"] * gate, {"align" if k == "loss" else f"align_{k}": v for k, v in parts.items()}

    def decode(self, raw: torch.Tensor) -> torch.Tensor:
        return self.head.decode(raw)


def write_anchors(grid: torch.Tensor, anchors: torch.Tensor, cells: torch.Tensor) -> torch.Tensor:
    """The map ``grid`` ``[B,C,h,w]`` with row j of ``anchors`` ``[B,K,C]`` written into cell
    ``cells[:, j]`` (indices into the row-major grid); the other cells unchanged."""
    b, c = grid.shape[:2]
    rows = anchors.transpose(1, 2).to(grid.dtype)  # [B, C, K]
    return grid.flatten(2).scatter(2, cells[:, None].expand(b, c, -1), rows).view_as(grid)


def box_targets(boxes: torch.Tensor, size: int) -> torch.Tensor:
    """``[B,1,5]`` x1, y1, x2, y2 (input pixels), score -> ``[B,4]`` cx, cy, w, h over the input size."""
    x1, y1, x2, y2 = boxes[:, 0, :4].unbind(-1)
    return torch.stack([(x1 + x2) / 2, (y1 + y2) / 2, x2 - x1, y2 - y1], dim=-1) / size

