"""CIFAR ResNet-18 (He et al. 2016a) and PreActResNet-18 (He et al. 2016b).

CIFAR variant: a 3×3 stride-1 stem conv and no max-pool, then four layers of two blocks with base
widths 64/128/256/512 (strides 1/2/2/2). Projection shortcuts (1×1 conv) where the shape changes.
ML-MMDR App. A, Table 1 (RBB/PBB block outputs): s1 = layer2 output, s2 = layer3, s3 = layer4 before
pooling, penult = pooled 512-d vector. PreActResNet: our choice, not the paper's: ML-MMDR's P-18
(App. A, Table 1) goes from the last PBB straight to GAP; ours keeps He et al. 2016b's final BN-ReLU
and takes s3 after it, so s3 is what the classifier pools and a pruned s3 channel is zero.
"""
from __future__ import annotations

from collections import OrderedDict
from typing import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from bdexp.models.base import MODELS, FeatureModel, ModelOptions, PoolFlatten, conv3x3, kaiming_init, scaled


class BasicBlock(nn.Module):
    """Post-activation residual block: relu(bn(conv(relu(bn(conv(x))))) + shortcut(x))."""

    def __init__(self, in_ch: int, out_ch: int, stride: int, shortcut: type[nn.Module] | None = None):
        """`shortcut` builds the projection when the shape changes: a 1x1 conv + BN by default,
        or e.g. the CIFAR ResNets' parameter-free option A, called as shortcut(in_ch, out_ch, stride)."""
        super().__init__()
        self.conv1 = conv3x3(in_ch, out_ch, stride)
        self.bn1 = nn.BatchNorm2d(out_ch)
        self.conv2 = conv3x3(out_ch, out_ch)
        self.bn2 = nn.BatchNorm2d(out_ch)
        self.shortcut: nn.Module = nn.Identity()
        if (stride != 1 or in_ch != out_ch) and shortcut is not None:
            self.shortcut = shortcut(in_ch, out_ch, stride)
        elif stride != 1 or in_ch != out_ch:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_ch, out_ch, kernel_size=1, stride=stride, bias=False), nn.BatchNorm2d(out_ch)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class PreActBlock(nn.Module):
    """Pre-activation residual block: conv(relu(bn(conv(relu(bn(x)))))) + shortcut."""

    def __init__(self, in_ch: int, out_ch: int, stride: int):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_ch)
        self.conv1 = conv3x3(in_ch, out_ch, stride)
        self.bn2 = nn.BatchNorm2d(out_ch)
        self.conv2 = conv3x3(out_ch, out_ch)
        self.shortcut: nn.Module | None = None
        if stride != 1 or in_ch != out_ch:
            self.shortcut = nn.Conv2d(in_ch, out_ch, kernel_size=1, stride=stride, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(x))
        # The projection shortcut sees the pre-activated input (He et al. 2016b, Fig. 4e).
        shortcut = self.shortcut(out) if self.shortcut is not None else x
        out = self.conv1(out)
        out = self.conv2(F.relu(self.bn2(out)))
        return out + shortcut


def _layer(block: type[nn.Module], in_ch: int, out_ch: int, blocks: int, stride: int) -> nn.Sequential:
    strides = [stride] + [1] * (blocks - 1)
    return nn.Sequential(*[block(in_ch if i == 0 else out_ch, out_ch, s) for i, s in enumerate(strides)])


class ResNet(FeatureModel):
    """CIFAR ResNet with four layers; `preact=True` gives the pre-activation variant."""

    def __init__(
        self,
        blocks: Sequence[int],
        preact: bool,
        in_channels: int,
        num_classes: int,
        mean: Sequence[float],
        std: Sequence[float],
        width: float,  # ModelOptions.width (conf/model/*.yaml)
    ):
        super().__init__(in_channels, num_classes, mean, std)
        block = PreActBlock if preact else BasicBlock
        w = [scaled(c, width) for c in (64, 128, 256, 512)]
        stem: nn.Module = conv3x3(in_channels, w[0])
        if not preact:
            stem = nn.Sequential(stem, nn.BatchNorm2d(w[0]), nn.ReLU(inplace=True))
        self.stage1 = nn.Sequential(
            OrderedDict(
                stem=stem,
                layer1=_layer(block, w[0], w[0], blocks[0], 1),
                layer2=_layer(block, w[0], w[1], blocks[1], 2),
            )
        )
        self.stage2 = _layer(block, w[1], w[2], blocks[2], 2)  # layer3
        layer4 = _layer(block, w[2], w[3], blocks[3], 2)
        if preact:
            # The pre-activation design's final BN-ReLU (He et al. 2016b) belongs to stage3, so s3
            # is the activated layer4 output the head pools. Neuron pruning (ML-MMDR §6.2, Fig. 10)
            # masks s3 channels; with the BN-ReLU after the mask a "pruned" channel would become
            # the constant ReLU(BN(0)) instead of zero.
            self.stage3 = nn.Sequential(
                OrderedDict(layer4=layer4, bn=nn.BatchNorm2d(w[3]), relu=nn.ReLU(inplace=True))
            )
        else:
            self.stage3 = layer4  # ends in a block's ReLU
        self.head = PoolFlatten()  # 0 stays 0: a pruned channel contributes nothing to penult
        self.fc = nn.Linear(w[3], num_classes)
        self._finish(w[3])
        kaiming_init(self)  # torchvision's ResNet init: convs fan_out, Linear left at default


@MODELS.register("resnet18", options=ModelOptions)
def resnet18(in_channels: int, num_classes: int, mean: Sequence[float], std: Sequence[float],
             opts: ModelOptions) -> ResNet:
    return ResNet([2, 2, 2, 2], False, in_channels, num_classes, mean, std, width=opts.width)


@MODELS.register("preact18", options=ModelOptions)
def preact18(in_channels: int, num_classes: int, mean: Sequence[float], std: Sequence[float],
             opts: ModelOptions) -> ResNet:
    return ResNet([2, 2, 2, 2], True, in_channels, num_classes, mean, std, width=opts.width)
