"""`synthetic`: generated, learnable data for tests and smoke runs (no files, no download).

Each class is a smooth random prototype (a coarse uniform-random grid, bicubically upsampled);
a sample is its class prototype plus i.i.d. Gaussian pixel noise, clipped to [0, 1] and
quantized. With the defaults a small ConvNet separates the classes within a few epochs.
Everything is drawn from one generator seeded with `split_seed`.
"""
from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from bdexp.data.base import DATASETS, ImageDataset
from bdexp.errors import ConfigError


@DATASETS.register("synthetic")
def synthetic(cfg: Any) -> ImageDataset:
    k = int(cfg.get("num_classes", 4))
    c = int(cfg.get("channels") or 3)
    s = int(cfg.get("image_size", 16))
    grid = int(cfg.get("prototype_grid", 4))  # coarse grid size: smaller = smoother prototypes
    noise = float(cfg.get("noise", 0.15))  # pixel noise std, in units of the [0, 1] range
    if k < 2 or grid < 1 or noise < 0:
        raise ConfigError(
            f"synthetic: need num_classes >= 2, prototype_grid >= 1, noise >= 0; got {k}, {grid}, {noise}"
        )
    g = torch.Generator().manual_seed(int(cfg.get("split_seed", 0)))

    coarse = torch.rand(k, c, grid, grid, generator=g)
    protos = F.interpolate(coarse, size=(s, s), mode="bicubic", align_corners=False).clamp(0, 1)
    protos = 0.15 + 0.7 * protos  # headroom so that the noise is rarely clipped

    def draw(n: int) -> tuple[torch.Tensor, torch.Tensor]:
        y = (torch.arange(n) % k)[torch.randperm(n, generator=g)]  # balanced classes
        x = protos[y] + noise * torch.randn(n, c, s, s, generator=g)
        return x.clamp(0, 1).mul(255).round().to(torch.uint8), y

    x_train, y_train = draw(int(cfg.get("train_size", 512)))
    x_test, y_test = draw(int(cfg.get("test_size", 128)))
    return ImageDataset("synthetic", x_train, y_train, x_test, y_test, [f"class{i}" for i in range(k)])
