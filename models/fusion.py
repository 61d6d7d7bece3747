"""Multi-scale fusion of the detector's three feature maps (trained)."""
from __future__ import annotations

import torch
from torch import nn

from .blocks import ConvBNAct


def _path(resample: nn.Module, in_ch: int, out_ch: int) -> nn.Sequential:
    return nn.Sequential(resample, ConvBNAct(in_ch, out_ch, 1), ConvBNAct(out_ch, out_ch, 3))


class _UpPath(nn.Sequential):
    """Nearest x2 upsampling, then 1x1 conv -> BN -> act, then a 3x3 conv block.

    A 1x1 convolution commutes with nearest upsampling (each output pixel is the same weighted
    sum of one source pixel), so it runs before the upsampling, on a quarter of the pixels and
    without the upsampled input map; BatchNorm still sees the upsampled map, as in the reference.
    """

    def __init__(self, in_ch: int, out_ch: int):
        super().__init__(nn.Upsample(scale_factor=2, mode="nearest"), ConvBNAct(in_ch, out_ch, 1),
                         ConvBNAct(out_ch, out_ch, 3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        upsample, reduce, block = self
        x = upsample(reduce.conv(x))
        return block(reduce.act(reduce.bn(x)))


class MultiScaleFusion(nn.Module):
    """Top-down then bottom-up exchange between the stride 8/16/32 maps; returns the fused
    stride-32 map ``[B, hidden, H/32, W/32]``, or with ``all_scales`` the fused stride 8, 16 and
    32 maps, each of ``hidden`` channels.

    ``mid_proj`` and ``bot_proj`` are the reference's projections of the other two scales. The
    weak model reads none of them, so they are not run then; they stay for checkpoint
    compatibility (``side_outputs=False`` leaves them out where no checkpoint needs them).
    """

    def __init__(self, planes: tuple[int, int, int] = (256, 512, 1024), hidden: int = 1024,
                 side_outputs: bool = True):
        super().__init__()
        small, mid, large = planes  # channels at strides 8, 16, 32
        half = hidden // 2
        # The reference lists the two upward paths in the opposite order of their use:
        # up[1] lifts the stride-32 map, up[0] the fused stride-16 one.
        self.up = nn.ModuleList([_UpPath(half + mid, half), _UpPath(large, half)])
        self.down = nn.ModuleList([
            _path(nn.AvgPool2d(2, 2), half + small, half),
            _path(nn.AvgPool2d(2, 2), 2 * half + mid, half),
        ])
        self.top_proj = ConvBNAct(half + large, hidden, 1)
        if side_outputs:
            self.mid_proj = ConvBNAct(2 * half + mid, hidden, 1)
            self.bot_proj = ConvBNAct(half + small, hidden, 1)

    def forward(self, s8: torch.Tensor, s16: torch.Tensor, s32: torch.Tensor,
                all_scales: bool = False) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        s16 = torch.cat([self.up[1](s32), s16], dim=1)
        s8 = torch.cat([self.up[0](s16), s8], dim=1)
        s16 = torch.cat([self.down[0](s8), s16], dim=1)
        s32 = torch.cat([self.down[1](s16), s32], dim=1)
        if all_scales:
            return self.bot_proj(s8), self.mid_proj(s16), self.top_proj(s32)
        return self.top_proj(s32)
