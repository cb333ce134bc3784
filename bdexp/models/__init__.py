"""Image classifiers that return logits and the feature levels {s1, s2, s3, penult} (ML-MMDR App. A).

`build_model(cfg, ...)` turns a `conf/model/*.yaml` node into a `FeatureModel`; the node's `name`
selects the factory in `MODELS` and every other key is passed to it as a keyword argument.
"""
from __future__ import annotations

import inspect
from collections.abc import Mapping
from typing import Any, Sequence

from omegaconf import DictConfig, OmegaConf

from bdexp.errors import ConfigError
from bdexp.models.base import LEVELS, MODELS, FeatureModel
from bdexp.registry import import_submodules

import_submodules(__name__, __path__)

__all__ = ["LEVELS", "MODELS", "FeatureModel", "build_model", "model_options"]

# Arguments build_model supplies itself; they are not config keys.
_PROVIDED = ("in_channels", "num_classes", "mean", "std")

# Smallest input side every model supports (our choice: 8×8 digits are the smallest images).
MIN_IMAGE_SIZE = 8


def model_options(name: str) -> list[str]:
    """The config keys model `name` accepts besides `name` (its factory's keyword arguments)."""
    params = inspect.signature(MODELS.get(name)).parameters
    return [p for p in params if p not in _PROVIDED]


def build_model(
    cfg: DictConfig | Mapping[str, Any],
    in_channels: int,
    num_classes: int,
    image_size: int,
    mean: Sequence[float],
    std: Sequence[float],
) -> FeatureModel:
    """Build the model named by `cfg.name` for images of `in_channels`×`image_size`×`image_size`."""
    if isinstance(cfg, DictConfig):
        options = OmegaConf.to_container(cfg, resolve=True)
    else:
        options = dict(cfg)
    assert isinstance(options, dict)
    name = options.pop("name", None)
    if name is None:
        raise ConfigError(f"model config needs a 'name' key; choose one of: {', '.join(MODELS.names())}")
    factory = MODELS.get(str(name))
    accepted = model_options(str(name))
    unknown = sorted(str(k) for k in options if k not in accepted)
    if unknown:
        raise ConfigError(
            f"model {name!r} got unexpected key(s) {', '.join(unknown)}; "
            f"accepted keys: name, {', '.join(accepted)}"
        )
    if int(image_size) < MIN_IMAGE_SIZE:
        raise ConfigError(f"model {name!r} needs images of at least {MIN_IMAGE_SIZE} px, got {image_size}")
    return factory(in_channels=in_channels, num_classes=num_classes, mean=mean, std=std, **options)
