"""`synthetic`: generated, learnable data for tests and smoke runs (no files, no download).

Each class is a smooth random prototype (a coarse uniform-random grid, bicubically upsampled);
a sample is its class prototype plus i.i.d. Gaussian pixel noise, clipped to [0, 1] and
quantized. With the defaults a small ConvNet separates the classes within a few epochs.
Everything is drawn from one generator seeded with `split_seed`.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from bdexp.data.base import DATASETS, Augment, DataOptions, ImageDataset
from bdexp.options import option


@dataclass(frozen=True)
class SyntheticAugment(Augment):
    """Off: the class is the pattern itself, shifts and flips blur it."""

    crop_padding: int = option(0, lo=0)
    flip: bool = False


@dataclass(frozen=True)
class SyntheticOptions(DataOptions):
    image_size: int = option(16, lo=8)
    num_classes: int = option(4, lo=2)  # a backdoor needs a target and another class
    train_size: int = option(512, lo=1)
    test_size: int = option(128, lo=1)
    prototype_grid: int = option(4, lo=1)  # coarse grid size: smaller = smoother prototypes
    noise: float = option(0.15, lo=0)  # pixel noise std, in units of the [0, 1] range
    split_seed: int = option(0, lo=0, hi=2**32 - 1)  # the data is fixed; the run seed only picks limits
    augment: SyntheticAugment = SyntheticAugment()


@DATASETS.register("synthetic", options=SyntheticOptions)
def synthetic(opts: SyntheticOptions) -> ImageDataset:
    k, c, s = opts.num_classes, opts.channels, opts.image_size
    grid, noise = opts.prototype_grid, opts.noise
    g = torch.Generator().manual_seed(opts.split_seed)

    coarse = torch.rand(k, c, grid, grid, generator=g)
    protos = F.interpolate(coarse, size=(s, s), mode="bicubic", align_corners=False).clamp(0, 1)
    protos = 0.15 + 0.7 * protos  # headroom so that the noise is rarely clipped

    def draw(n: int) -> tuple[torch.Tensor, torch.Tensor]:
        y = (torch.arange(n) % k)[torch.randperm(n, generator=g)]  # balanced classes
        x = protos[y] + noise * torch.randn(n, c, s, s, generator=g)
        return x.clamp(0, 1).mul(255).round().to(torch.uint8), y

    x_train, y_train = draw(opts.train_size)
    x_test, y_test = draw(opts.test_size)
    return ImageDataset("synthetic", x_train, y_train, x_test, y_test, [f"class{i}" for i in range(k)])
