"""Image classifiers that return logits and the feature levels {s1, s2, s3, penult} (ML-MMDR App. A).

`build_model(cfg, ...)` turns a `conf/model/*.yaml` node into a `FeatureModel`: the node's `name`
selects the factory in `MODELS`, the rest is parsed by the options it declares (`ModelOptions`).
`build_for(cfg, x_train, num_classes)` builds one for a training set, normalized with that set's
per-channel statistics (the run's model and every defender's model).
"""
from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Sequence

import torch
from omegaconf import DictConfig

from bdexp.errors import ConfigError
from bdexp.models.base import LEVELS, MODELS, FeatureModel, ModelOptions
from bdexp.registry import import_submodules

import_submodules(__name__, __path__)

__all__ = ["LEVELS", "MODELS", "FeatureModel", "ModelOptions", "build_for", "build_model", "image_stats"]

# Smallest input side every model supports (our choice: 8×8 digits are the smallest images).
MIN_IMAGE_SIZE = 8


def build_model(
    cfg: DictConfig | Mapping[str, Any],
    in_channels: int,
    num_classes: int,
    image_size: int,
    mean: Sequence[float],
    std: Sequence[float],
) -> FeatureModel:
    """Build the model named by `cfg.name` for images of `in_channels`×`image_size`×`image_size`."""
    name = cfg.get("name")
    if name is None:
        raise ConfigError(f"model config needs a 'name' key; choose one of: {', '.join(MODELS.names())}")
    factory = MODELS.get(str(name))
    opts = MODELS.options(str(name)).parse(cfg, "model")
    if int(image_size) < MIN_IMAGE_SIZE:
        raise ConfigError(f"model {name!r} needs images of at least {MIN_IMAGE_SIZE} px, got {image_size}")
    return factory(in_channels, num_classes, mean, std, opts)


def image_stats(x: torch.Tensor, chunk: int = 4096) -> tuple[list[float], list[float]]:
    """Per-channel mean and std (unbiased, clamped >= 1e-3) of images `x` (N, C, H, W) in [0, 1]
    units (uint8 images are divided by 255), in float64 and in chunks."""
    total = torch.zeros(x.shape[1], dtype=torch.float64)
    squares = torch.zeros_like(total)
    for start in range(0, len(x), chunk):
        xb = x[start:start + chunk].to(torch.float64)
        if x.dtype == torch.uint8:
            xb = xb.div_(255)
        total += xb.sum(dim=(0, 2, 3)).cpu()
        squares += xb.pow(2).sum(dim=(0, 2, 3)).cpu()
    count = max(1, len(x) * x.shape[2] * x.shape[3])
    mean = total / count
    var = (squares / count - mean**2).clamp_min(0) * count / max(count - 1, 1)
    return mean.tolist(), var.sqrt().clamp_min(1e-3).tolist()


def build_for(cfg: DictConfig | Mapping[str, Any], x_train: torch.Tensor, num_classes: int,
              stats: tuple[Sequence[float], Sequence[float]] | None = None) -> FeatureModel:
    """The model `cfg` for training images `x_train` (N, C, H, W), normalized with their
    per-channel statistics (`image_stats`; `stats`: (mean, std) computed before)."""
    mean, std = stats if stats is not None else image_stats(x_train)
    return build_model(cfg, in_channels=x_train.shape[1], num_classes=num_classes, image_size=x_train.shape[-1],
                       mean=mean, std=std)
