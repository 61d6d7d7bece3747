"""Building blocks shared by the detector and the multi-scale fusion."""
from __future__ import annotations

import torch
from torch import nn


class ConvBNAct(nn.Sequential):
    """Conv (no bias, 'same' padding) -> BatchNorm -> LeakyReLU(0.1), the darknet convolution, or
    SiLU (``activation='silu'``, YOLOX's and SimREC's)."""

    def __init__(self, in_ch: int, out_ch: int, kernel_size: int, stride: int = 1, activation: str = "leaky"):
        super().__init__()
        self.conv = nn.Conv2d(in_ch, out_ch, kernel_size, stride, (kernel_size - 1) // 2, bias=False)
        self.bn = nn.BatchNorm2d(out_ch)
        # LeakyReLU in place: the BatchNorm output is read by nothing else, and its backward needs
        # only the sign of its output. SiLU's backward needs its input, so it keeps it.
        self.act = nn.SiLU() if activation == "silu" else nn.LeakyReLU(0.1, inplace=True)


class ResidualStage(nn.Module):
    """``n`` pairs of [1x1 c->c/2, 3x3 c/2->c]; each pair's output is added to its input when
    ``shortcut`` (YOLOv3's neck reuses the stage with the addition turned off)."""

    def __init__(self, ch: int, n: int = 1, shortcut: bool = True):
        super().__init__()
        self.shortcut = shortcut
        self.blocks = nn.ModuleList(
            nn.Sequential(ConvBNAct(ch, ch // 2, 1), ConvBNAct(ch // 2, ch, 3)) for _ in range(n))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            x = x + block(x) if self.shortcut else block(x)
        return x
