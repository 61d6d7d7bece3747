"""The frozen detector: YOLOv3 (DarkNet-53 + SPP neck) with guided-anchor heads.

The layer list has 38 entries whose indices are part of the pretrained
weight-file format (``module_list.<i>`` in the reference's naming, see
``models/reference_keys.py``), so the network is kept as one indexed list and the
routing between entries is spelled out in ``forward``.
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torchvision.ops import DeformConv2d

from .blocks import ConvBNAct, ResidualStage

HEAD_INDICES = (19, 28, 37)  # strides 32, 16, 8
HEAD_STRIDES = (32, 16, 8)
_ANCHORS_PER_CELL = 4  # three priors plus one anchor-free box


class SPP(nn.Module):
    """concat(x, maxpool k1, k2, k3) at stride 1; the reference's sizes are 5, 9, 13."""

    def __init__(self, kernels: Sequence[int] = (5, 9, 13)):
        super().__init__()
        self.kernels = tuple(kernels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pools = [F.max_pool2d(x, k, stride=1, padding=k // 2) for k in self.kernels]
        return torch.cat([x, *pools], dim=1)


class FeatureAdaption(nn.Module):
    """Deformable 3x3 conv whose offsets come from the (detached) predicted anchor shapes."""

    def __init__(self, ch: int):
        super().__init__()
        n = _ANCHORS_PER_CELL
        self.offset = nn.Conv2d(2 * n, 2 * 9 * n, 1, groups=n)
        self.deform_conv = DeformConv2d(ch, ch, 3, padding=1)

    def forward(self, x: torch.Tensor, shape_pred: torch.Tensor) -> torch.Tensor:
        offset = self.offset(shape_pred.detach())
        if torch.is_autocast_enabled(x.device.type):
            # torchvision's CPU kernel has no bf16 version; on CUDA its autocast rule runs in fp32 too.
            with torch.autocast(x.device.type, enabled=False):
                return self.deform_conv(x.float(), offset.float())
        return self.deform_conv(x, offset)


class GuidedAnchorHead(nn.Module):
    """Predicts per cell 4 boxes: 3 guided by priors, 1 anchor-free.

    Returns decoded boxes grid-major, ``[B, H*W, 4, 5 + classes]`` with
    (cx, cy, w, h) in input pixels, then sigmoid objectness and class scores.
    """

    def __init__(self, in_ch: int, priors: Sequence[Sequence[float]], stride: int, num_classes: int):
        super().__init__()
        n = _ANCHORS_PER_CELL
        self.stride = stride
        self.num_outputs = 5 + num_classes
        self.shape_pred = nn.Conv2d(in_ch, 2 * n, 1)
        self.adaption = FeatureAdaption(in_ch)
        self.pred = nn.Conv2d(in_ch, n * self.num_outputs, 1)
        anchor_wh = [list(map(float, p)) for p in priors] + [[4.0 * stride, 4.0 * stride]]
        self.register_buffer("anchor_wh", torch.tensor(anchor_wh), persistent=False)  # [4, 2]

    def raw(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Undecoded outputs: shape logits ``[B,H,W,4,2]`` and box logits ``[B,H,W,4,5+C]``."""
        b, _, h, w = x.shape
        shape_pred = self.shape_pred(x)
        out = self.pred(self.adaption(x, shape_pred))
        shape_pred = shape_pred.view(b, _ANCHORS_PER_CELL, 2, h, w).permute(0, 3, 4, 1, 2)
        out = out.view(b, _ANCHORS_PER_CELL, self.num_outputs, h, w).permute(0, 3, 4, 1, 2)
        return shape_pred, out

    def decode(self, shape_pred: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        b, h, w = out.shape[:3]
        ys, xs = torch.meshgrid(torch.arange(h, device=out.device, dtype=out.dtype),
                                torch.arange(w, device=out.device, dtype=out.dtype), indexing="ij")
        anchor_wh = shape_pred.exp() * self.anchor_wh.to(out.dtype)  # [B,H,W,4,2]
        cx = (out[..., 0].sigmoid() + xs[:, :, None]) * self.stride
        cy = (out[..., 1].sigmoid() + ys[:, :, None]) * self.stride
        wh = out[..., 2:4].exp() * anchor_wh
        scores = out[..., 4:].sigmoid()
        boxes = torch.cat([cx[..., None], cy[..., None], wh, scores], dim=-1)
        return boxes.reshape(b, h * w, _ANCHORS_PER_CELL, self.num_outputs)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.decode(*self.raw(x))


class YOLOv3(nn.Module):
    """DarkNet-53 backbone, SPP neck and three guided-anchor heads.

    ``width`` scales every channel count (1.0 is the reference detector) and ``min_channels`` bounds
    the result from below; ``spp_kernels`` are the SPP's pool sizes.
    """

    def __init__(self, num_classes: int = 80, anchors: Sequence[Sequence[float]] = (),
                 anchor_masks: Sequence[Sequence[int]] = (), width: float = 1.0,
                 spp_kernels: Sequence[int] = (5, 9, 13), min_channels: int = 0):
        super().__init__()
        if not (32 * width).is_integer() or width <= 0:
            raise ValueError(f"VIS_WIDTH must be a positive multiple of 1/32, got {width}")

        def c(ch: int) -> int:
            return max(int(ch * width), min_channels)

        def head(i: int, ch: int) -> GuidedAnchorHead:
            return GuidedAnchorHead(c(ch), [anchors[a] for a in anchor_masks[i]],
                                    HEAD_STRIDES[i], num_classes)

        self.channels = (c(1024), c(512), c(256))  # inputs of the stride 32, 16, 8 heads
        self.layers = nn.ModuleList([
            ConvBNAct(3, c(32), 3),                        # 0
            ConvBNAct(c(32), c(64), 3, 2),                 # 1
            ResidualStage(c(64)),                          # 2
            ConvBNAct(c(64), c(128), 3, 2),                # 3
            ResidualStage(c(128), 2),                      # 4
            ConvBNAct(c(128), c(256), 3, 2),               # 5
            ResidualStage(c(256), 8),                      # 6  -> route (stride 8)
            ConvBNAct(c(256), c(512), 3, 2),               # 7
            ResidualStage(c(512), 8),                      # 8  -> route (stride 16)
            ConvBNAct(c(512), c(1024), 3, 2),              # 9
            ResidualStage(c(1024), 4),                     # 10
            ResidualStage(c(1024), 1, shortcut=False),     # 11
            ConvBNAct(c(1024), c(512), 1),                 # 12
            SPP(spp_kernels),                              # 13
            ConvBNAct(4 * c(512), c(512), 1),              # 14
            ConvBNAct(c(512), c(1024), 3),                 # 15
            nn.Identity(),                                 # 16 DropBlock, keep_prob 1
            ConvBNAct(c(1024), c(512), 1),                 # 17 -> route
            ConvBNAct(c(512), c(1024), 3),                 # 18
            head(0, 1024),                                 # 19 stride 32
            ConvBNAct(c(512), c(256), 1),                  # 20 (from 17)
            nn.Upsample(scale_factor=2, mode="nearest"),   # 21 -> cat with 8
            ConvBNAct(c(256) + c(512), c(256), 1),         # 22
            ConvBNAct(c(256), c(512), 3),                  # 23
            nn.Identity(),                                 # 24 DropBlock
            ResidualStage(c(512), 1, shortcut=False),      # 25
            ConvBNAct(c(512), c(256), 1),                  # 26 -> route
            ConvBNAct(c(256), c(512), 3),                  # 27
            head(1, 512),                                  # 28 stride 16
            ConvBNAct(c(256), c(128), 1),                  # 29 (from 26)
            nn.Upsample(scale_factor=2, mode="nearest"),   # 30 -> cat with 6
            ConvBNAct(c(128) + c(256), c(128), 1),         # 31
            ConvBNAct(c(128), c(256), 3),                  # 32
            nn.Identity(),                                 # 33 DropBlock
            ResidualStage(c(256), 1, shortcut=False),      # 34
            ConvBNAct(c(256), c(128), 1),                  # 35
            ConvBNAct(c(128), c(256), 3),                  # 36
            head(2, 256),                                  # 37 stride 8
        ])

    @property
    def heads(self) -> list[GuidedAnchorHead]:
        return [self.layers[i] for i in HEAD_INDICES]

    def forward(self, x: torch.Tensor, heads: Sequence[int] = (0, 1, 2),
                decode: bool = True) -> tuple[list[torch.Tensor], list[torch.Tensor | None]]:
        """Returns the three head inputs (strides 32, 16, 8) and the outputs of the heads
        listed in ``heads`` (decoded boxes, or ``(shape, box)`` logits when not ``decode``);
        heads not listed are skipped and give ``None``."""
        features: list[torch.Tensor] = []
        outputs: list[torch.Tensor | None] = [None, None, None]
        routes: dict[int, torch.Tensor] = {}
        for i, layer in enumerate(self.layers):
            if i in HEAD_INDICES:
                k = HEAD_INDICES.index(i)
                features.append(x)
                if k in heads:
                    outputs[k] = layer(x) if decode else layer.raw(x)
                if i == 19:
                    x = routes[17]
                elif i == 28:
                    x = routes[26]
                continue
            x = layer(x)
            if i in (6, 8, 17, 26):
                routes[i] = x
            elif i == 21:
                x = torch.cat([x, routes[8]], dim=1)
            elif i == 30:
                x = torch.cat([x, routes[6]], dim=1)
        return features, outputs
