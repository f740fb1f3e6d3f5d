"""A small residual CNN over spectrogram features, built for CPU serving speed.

A strided stem plus max-pool shrinks the time-frequency map 4x per axis (by default;
`stem_pool` can pool frequency harder) before any residual block runs, and each later
stage halves it again, so most FLOPs sit in small maps. The
embedding pools frequency by mean and time by mean + max (events are often short).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn


class ResBlock(nn.Module):
    """[B, c_in, F, T] -> [B, c_out, F/stride, T/stride]: two 3x3 convs with batch norm,
    dropout between them, identity (or 1x1 projection) shortcut."""

    def __init__(self, c_in: int, c_out: int, stride: int = 1, dropout: float = 0.0) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.drop = nn.Dropout2d(dropout) if dropout > 0 else nn.Identity()
        self.act = nn.ReLU(inplace=True)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or c_in != c_out:
            self.shortcut = nn.Sequential(
                nn.Conv2d(c_in, c_out, 1, stride=stride, bias=False), nn.BatchNorm2d(c_out)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.act(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(self.drop(out)))
        return self.act(out + self.shortcut(x))


class FaultCNN(nn.Module):
    """Features [B, in_channels, F, frames] -> embedding [B, out_dim] (out_dim = widths[-1]*2).

    Args:
        widths: channels per stage; the first stage runs at the stem's resolution, each
            later one halves both axes.
        blocks_per_stage: residual blocks per stage (depth).
        stem_stride: stride of the first conv.
        stem_pool: max-pool after the stem conv, (frequency, time) or one int for both;
            (4, 2) gives 128 mel bands the residual stages' map size of 64 bands.
        dropout: Dropout2d inside residual blocks.
    """

    def __init__(
        self,
        widths: Sequence[int] = (16, 32, 64, 128),
        blocks_per_stage: int = 1,
        stem_stride: int = 2,
        stem_pool: int | Sequence[int] = 2,
        dropout: float = 0.1,
        in_channels: int = 1,
    ) -> None:
        super().__init__()
        widths = list(widths)
        self.stem = nn.Sequential(
            nn.Conv2d(in_channels, widths[0], 3, stride=stem_stride, padding=1, bias=False),
            nn.BatchNorm2d(widths[0]),
            nn.ReLU(inplace=True),
            nn.MaxPool2d(stem_pool if isinstance(stem_pool, int) else tuple(stem_pool)),
        )
        layers: list[nn.Module] = []
        c_in = widths[0]
        for i, width in enumerate(widths):
            for j in range(blocks_per_stage):
                stride = 2 if (i > 0 and j == 0) else 1
                layers.append(ResBlock(c_in, width, stride=stride, dropout=dropout))
                c_in = width
        self.blocks = nn.Sequential(*layers)
        self.out_dim = widths[-1] * 2

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.blocks(self.stem(x))  # [B, C, F', T']
        x = x.mean(dim=2)  # frequency
        return torch.cat([x.mean(dim=2), x.amax(dim=2)], dim=1)
