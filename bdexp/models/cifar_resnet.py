"""CIFAR ResNets of depth 6n+2 (He et al. 2016a, §4.2): ResNet-32 (n=5) and ResNet-56 (n=9).

A 3×3 stem conv with 16 channels, then three stages of n basic blocks with widths 16/32/64
(strides 1/2/2), global average pool and a linear layer. Shortcuts are option A: identity, or a
stride-2 subsample padded with zero channels when the shape changes (parameter-free).
Levels (our mapping, by analogy with ML-MMDR App. A): s1/s2/s3 = stage-1/2/3 outputs, penult = pooled 64-d vector.
"""
from __future__ import annotations

from collections import OrderedDict
from typing import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from bdexp.models.base import MODELS, FeatureModel, ModelOptions, PoolFlatten, conv3x3, kaiming_init, scaled
from bdexp.models.resnet import BasicBlock


class ShortcutA(nn.Module):
    """Option-A shortcut: take every `stride`-th pixel and zero-pad the extra output channels."""

    def __init__(self, in_ch: int, out_ch: int, stride: int):
        super().__init__()
        extra = out_ch - in_ch
        if extra < 0:
            raise ValueError(f"option-A shortcut cannot reduce channels ({in_ch} -> {out_ch})")
        self.stride = stride
        self.pad = (extra // 2, extra - extra // 2)  # split evenly before/after, as is customary

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.stride != 1:
            x = x[:, :, :: self.stride, :: self.stride]
        if self.pad != (0, 0):
            x = F.pad(x, (0, 0, 0, 0, self.pad[0], self.pad[1]))
        return x


def _stage(in_ch: int, out_ch: int, n: int, stride: int) -> nn.Sequential:
    return nn.Sequential(*[BasicBlock(in_ch if i == 0 else out_ch, out_ch, stride if i == 0 else 1, shortcut=ShortcutA)
                           for i in range(n)])


class CifarResNet(FeatureModel):
    """He et al.'s CIFAR ResNet with `n` blocks per stage (depth 6n+2)."""

    def __init__(
        self,
        n: int,
        in_channels: int,
        num_classes: int,
        mean: Sequence[float],
        std: Sequence[float],
        width: float,  # ModelOptions.width (conf/model/*.yaml)
    ):
        super().__init__(in_channels, num_classes, mean, std)
        w = [scaled(c, width) for c in (16, 32, 64)]
        stem = nn.Sequential(conv3x3(in_channels, w[0]), nn.BatchNorm2d(w[0]), nn.ReLU(inplace=True))
        self.stage1 = nn.Sequential(OrderedDict(stem=stem, layer1=_stage(w[0], w[0], n, 1)))
        self.stage2 = _stage(w[0], w[1], n, 2)
        self.stage3 = _stage(w[1], w[2], n, 2)
        self.head = PoolFlatten()
        self.fc = nn.Linear(w[2], num_classes)
        self._finish(w[2])
        kaiming_init(self, fan_mode="fan_in")


@MODELS.register("resnet32", options=ModelOptions)
def resnet32(in_channels: int, num_classes: int, mean: Sequence[float], std: Sequence[float],
             opts: ModelOptions) -> CifarResNet:
    return CifarResNet(5, in_channels, num_classes, mean, std, width=opts.width)  # 6·5+2 = 32


@MODELS.register("resnet56", options=ModelOptions)
def resnet56(in_channels: int, num_classes: int, mean: Sequence[float], std: Sequence[float],
             opts: ModelOptions) -> CifarResNet:
    return CifarResNet(9, in_channels, num_classes, mean, std, width=opts.width)  # 6·9+2 = 56
