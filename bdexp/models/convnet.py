"""A small, fast ConvNet: the CPU default for 16 px digits and 28 px Fashion-MNIST (our choice).

A VGG in miniature, so its levels sit where VGG-11's do (ML-MMDR App. A: s1/s2/s3 at 1/4, 1/8 and 1/16
of a 32 px input, each taken after a conv's ReLU and before the pool):

    stage1: conv(32), maxpool, conv(64)   s1 at 1/2 resolution   (64×14×14 at 28 px)
    stage2: maxpool, conv(128)            s2 at 1/4 resolution   (128×7×7)
    stage3: maxpool, conv(128)            s3 at 1/8 resolution   (128×3×3)
    head:   global average pool -> fc

A first version kept s1 at full resolution and s3 at 1/4: its s3 was a 7×7 spatial map in which
a corner trigger stays localized, unlike the 2×2 (VGG) or 4×4 (ResNet) s3 of the paper's models.
About 242k parameters at width 1.0 (239 904 in the four 3×3 convs, 704 in BatchNorm, 1 290 in
the 10-class fc; 1-channel input) and ~9 M multiply-adds per 28 px image.
"""
from __future__ import annotations

from typing import Sequence

import torch.nn as nn

from bdexp.models.base import (MODELS, FeatureModel, ModelOptions, PoolFlatten, SafeMaxPool2d, conv3x3, kaiming_init,
                               scaled)


def conv_bn_relu(in_ch: int, out_ch: int) -> nn.Sequential:
    return nn.Sequential(conv3x3(in_ch, out_ch), nn.BatchNorm2d(out_ch), nn.ReLU(inplace=True))


class ConvNet(FeatureModel):
    """Four conv-BN-ReLU layers (32/64/128/128 channels scaled by `width`) in three stages."""

    def __init__(
        self,
        in_channels: int,
        num_classes: int,
        mean: Sequence[float],
        std: Sequence[float],
        width: float,  # ModelOptions.width (conf/model/*.yaml)
    ):
        super().__init__(in_channels, num_classes, mean, std)
        c1, c2, c3 = scaled(32, width), scaled(64, width), scaled(128, width)
        self.stage1 = nn.Sequential(conv_bn_relu(in_channels, c1), SafeMaxPool2d(), conv_bn_relu(c1, c2))
        self.stage2 = nn.Sequential(SafeMaxPool2d(), conv_bn_relu(c2, c3))
        self.stage3 = nn.Sequential(SafeMaxPool2d(), conv_bn_relu(c3, c3))
        self.head = PoolFlatten()
        self.fc = nn.Linear(c3, num_classes)
        self._finish(c3)
        kaiming_init(self)


@MODELS.register("convnet", options=ModelOptions)
def convnet(in_channels: int, num_classes: int, mean: Sequence[float], std: Sequence[float],
            opts: ModelOptions) -> ConvNet:
    return ConvNet(in_channels, num_classes, mean, std, width=opts.width)
