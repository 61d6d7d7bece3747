"""APL's visual alignment: a supervised box head on language-fused features, trained online on the
weak model's own best-anchor boxes (APL_ALIGNMENT), built as APL's code (models/APL/net.py) builds it.

The prompted anchor embeddings are written back into their cells of the fused stride-32 map; the
three fused maps are each narrowed to HIDDEN_SIZE channels and gated by the expression
(:class:`AlignmentGate`, APL's SimpleFusion), fused across scales again (APL's second
MultiScaleFusion), attended by the expression (:class:`AlignmentAttention`, APL's GaranAttention)
and given to the anchor-free box head of ``models/box_head.py``. The expression's features are
detached, as in APL: the head trains the visual side only. The student (``models/student.py``) has
its own gate and attention, SimREC's.

Shapes: B images, K selected anchors, D = HIDDEN_SIZE, C the fused maps' channels.
"""
from __future__ import annotations

import torch
from torch import nn

from .box_head import BoxHead
from .fusion import MultiScaleFusion
from .box_prediction import cell_box
from .student import CollectDiffuseAttention

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
        self.gates = nn.ModuleList(AlignmentGate(channels, hidden, hidden) for _ in range(3))
        # APL builds (and runs) the fusion's side projections, but reads only its stride-32 output:
        # their weights never train (no gradient reaches them), their BatchNorm statistics do.
        self.multi_scale = MultiScaleFusion((hidden, hidden, hidden), hidden)
        for module in (self.multi_scale.mid_proj, self.multi_scale.bot_proj):
            module.requires_grad_(False)
        self.attention = AlignmentAttention(hidden, hidden)
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
        fused = self.multi_scale(*gated, all_scales=self.training)
        return self.head(self.attention(fused[-1] if self.training else fused, language))

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


class AlignmentGate(nn.Module):
    """APL's SimpleFusion: a map ``[B,C,H,W]`` narrowed to ``out`` channels and gated channel by
    channel by the expression ``[B,D]``: ``act(BN(v(map) * q(expression)))`` -> ``[B,out,H,W]``.

    Both projections are a 1x1 convolution with a bias, BatchNorm and LeakyReLU(0.1); the
    expression's runs on it as a ``[B,D,1,1]`` map, so in training its BatchNorm normalises over
    the batch (a batch of one cannot train). The student's gate (SimREC's) keeps the map's width.
    """

    def __init__(self, channels: int, text_dim: int, out: int):
        super().__init__()
        self.visual = nn.Sequential(nn.Conv2d(channels, out, 1), nn.BatchNorm2d(out), nn.LeakyReLU(0.1))
        self.text = nn.Sequential(nn.Conv2d(text_dim, out, 1), nn.BatchNorm2d(out), nn.LeakyReLU(0.1))
        self.norm = nn.Sequential(nn.BatchNorm2d(out), nn.LeakyReLU(0.1))

    def forward(self, x: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
        return self.norm(self.visual(x) * self.text(text[:, :, None, None]))


class AlignmentAttention(CollectDiffuseAttention):
    """APL's GaranAttention, ``[B,C,H,W]``, ``[B,D]`` -> ``[B,C,H,W]``: the student's layers, APL's
    forward. Per head (``C / heads`` channels each), the expression collects one vector from the map
    (softmax over positions, logits divided by sqrt(C / heads)) and diffuses it back to every
    position scaled by the sigmoid of that position's match with the expression; then a 1x1
    convolution, BatchNorm, the residual map and LeakyReLU(0.1).

    Kept from APL's code, unlike the student's attention (``models/student.py``):
    - dropout (``dropout``, APL's 0.1) on the collect weights and on the diffuse weights, in
      training only;
    - the diffused map is laid out as ``[w, h]`` and read back as ``[h, w]`` before the output
      convolution: transposed on a square map, shuffled on others; the residual is not;
    - ``mask_pred``, GARAN's 3x3 convolution to a one-channel map: APL computes the map and
      discards it, so it is never run here and its weights never train (they stay for APL's
      checkpoints).
    """

    def __init__(self, channels: int, text_dim: int, heads: int = 2, dropout: float = 0.1):
        super().__init__(channels, text_dim, heads)
        self.mask_pred = nn.Conv2d(channels, 1, 3, padding=1).requires_grad_(False)
        self.collect_dropout = nn.Dropout(dropout)
        self.diffuse_dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        d = c // self.heads

        def split(y: torch.Tensor) -> torch.Tensor:  # [B,C,H,W] -> [B,heads,d,H*W]
            return y.view(b, self.heads, d, h * w)

        query = self.query(text).view(b, self.heads, 1, d)
        temperature = d ** 0.5
        collect = self.collect_dropout(((query @ split(self.collect_key(x))) / temperature).softmax(dim=-1))
        gathered = split(self.value(x)) @ collect.transpose(-1, -2)  # [B, heads, d, 1]
        diffuse = self.diffuse_dropout(((query @ split(self.diffuse_key(x))) / temperature).sigmoid())
        context = (gathered * diffuse).view(b, c, h, w)
        # APL's height/width swap (see the class docstring).
        context = context.transpose(2, 3).reshape(b, c, h, w)
        return self.act(self.norm(self.out(context)) + x)


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

