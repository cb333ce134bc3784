"""CIFAR-style VGG with BatchNorm (Simonyan & Zisserman 2015, configurations A and D).

Each 3×3 conv is followed by BN and ReLU; "M" is a 2×2 max-pool. The classifier is a global average
pool (1×1 at 32 px after the last pool) and one Linear(512·width, num_classes), as in the common
CIFAR variant. Feature taps follow ML-MMDR App. A: s1/s2/s3 end at the listed (1-based) ReLU.
"""
from __future__ import annotations

from typing import Sequence, Union

import torch.nn as nn

from bdexp.models.base import (MODELS, FeatureModel, ModelOptions, PoolFlatten, SafeMaxPool2d, conv3x3, kaiming_init,
                               scaled)

LayerSpec = Union[int, str]

# Configurations A (VGG-11) and D (VGG-16); ints are output channels at width 1.0.
VGG_CFGS: dict[str, list[LayerSpec]] = {
    "vgg11": [64, "M", 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M"],
    "vgg16": [64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M"],
}

# The ReLU (1-based count) that ends s1, s2, s3. VGG-11: 4th/6th/8th, i.e. ML-MMDR App. A layers
# 14/21/28 of the BN Sequential; VGG-16: 7th/10th/13th (our choice, by analogy; App. A layers 23/33/43).
VGG_TAPS: dict[str, tuple[int, int, int]] = {
    "vgg11": (4, 6, 8),
    "vgg16": (7, 10, 13),
}


class VGG(FeatureModel):
    """VGG-BN split into three stages at the ReLUs in `taps`; layers after the last tap form the head."""

    def __init__(
        self,
        layers: Sequence[LayerSpec],
        taps: tuple[int, int, int],
        in_channels: int,
        num_classes: int,
        mean: Sequence[float],
        std: Sequence[float],
        width: float,  # ModelOptions.width (conf/model/*.yaml)
    ):
        super().__init__(in_channels, num_classes, mean, std)
        groups: list[list[nn.Module]] = [[]]
        channels = in_channels
        relus = 0
        for spec in layers:
            if spec == "M":
                groups[-1].append(SafeMaxPool2d())
                continue
            out = scaled(int(spec), width)
            groups[-1] += [conv3x3(channels, out), nn.BatchNorm2d(out), nn.ReLU(inplace=True)]
            channels = out
            relus += 1
            if relus in taps:
                if relus == taps[2]:
                    s3_channels = channels
                groups.append([])
        if len(groups) != 4:
            raise ValueError(f"VGG taps {taps} do not match a configuration with {relus} ReLUs")
        self.stage1 = nn.Sequential(*groups[0])
        self.stage2 = nn.Sequential(*groups[1])
        self.stage3 = nn.Sequential(*groups[2])
        self.head = PoolFlatten(*groups[3])  # the final max-pool(s), then global average pool
        self.fc = nn.Linear(channels, num_classes)
        self._finish(s3_channels)
        kaiming_init(self, linear_std=0.01)  # torchvision's VGG init


def _vgg(
    name: str, in_channels: int, num_classes: int, mean: Sequence[float], std: Sequence[float], width: float
) -> VGG:
    return VGG(VGG_CFGS[name], VGG_TAPS[name], in_channels, num_classes, mean, std, width=width)


@MODELS.register("vgg11", options=ModelOptions)
def vgg11(in_channels: int, num_classes: int, mean: Sequence[float], std: Sequence[float],
          opts: ModelOptions) -> VGG:
    return _vgg("vgg11", in_channels, num_classes, mean, std, opts.width)


@MODELS.register("vgg16", options=ModelOptions)
def vgg16(in_channels: int, num_classes: int, mean: Sequence[float], std: Sequence[float],
          opts: ModelOptions) -> VGG:
    return _vgg("vgg16", in_channels, num_classes, mean, std, opts.width)
