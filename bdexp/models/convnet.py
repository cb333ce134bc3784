"""A small, fast ConvNet: the CPU default for 16 px digits and 28 px Fashion-MNIST (SPEC §2, last row).

Three stages; s1/s2/s3 are their outputs, penult the globally pooled stage-3 vector:

    stage1: conv(32)                      full resolution
    stage2: maxpool, conv(64), conv(64)   1/2 resolution
    stage3: maxpool, conv(128)            1/4 resolution
    head:   global average pool -> fc

About 130k parameters at width 1.0 (most of them in the 64->128 conv).
"""
from __future__ import annotations

from typing import Sequence

import torch.nn as nn

from bdexp.models.base import MODELS, FeatureModel, PoolFlatten, SafeMaxPool2d, conv3x3, kaiming_init, scaled


def conv_bn_relu(in_ch: int, out_ch: int) -> nn.Sequential:
    return nn.Sequential(conv3x3(in_ch, out_ch), nn.BatchNorm2d(out_ch), nn.ReLU(inplace=True))


class ConvNet(FeatureModel):
    """Three conv-BN-ReLU stages with base widths 32/64/128 scaled by `width`."""

    def __init__(
        self,
        in_channels: int,
        num_classes: int,
        mean: Sequence[float],
        std: Sequence[float],
        width: float = 1.0,
    ):
        super().__init__(in_channels, num_classes, mean, std)
        c1, c2, c3 = scaled(32, width), scaled(64, width), scaled(128, width)
        self.stage1 = conv_bn_relu(in_channels, c1)
        self.stage2 = nn.Sequential(SafeMaxPool2d(), conv_bn_relu(c1, c2), conv_bn_relu(c2, c2))
        self.stage3 = nn.Sequential(SafeMaxPool2d(), conv_bn_relu(c2, c3))
        self.head = PoolFlatten()
        self.fc = nn.Linear(c3, num_classes)
        self._finish(c3)
        kaiming_init(self)


@MODELS.register("convnet")
def convnet(
    in_channels: int,
    num_classes: int,
    mean: Sequence[float],
    std: Sequence[float],
    width: float = 1.0,
) -> ConvNet:
    return ConvNet(in_channels, num_classes, mean, std, width=width)
