"""The model contract (levels after ML-MMDR App. A): logits plus the named features {s1, s2, s3, penult} from one pass.

Every model is a `FeatureModel` built from five parts, so that all families share one `forward`:

    normalize -> stage1 -> s1 -> stage2 -> s2 -> stage3 -> s3 (* s3_channel_mask) -> head -> penult -> fc

stage3 includes the last activation (e.g. PreActResNet's final BN-ReLU) and `head` only pools, so
a channel zeroed by the mask is zero in `penult` too (neuron pruning, ML-MMDR §6.2 / Fig. 10).

Features are returned from `forward` itself, not collected with hooks (the ML-MMDR
authors report that hook-based training did worse).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Literal, Sequence, get_args, overload

import torch
import torch.nn as nn
import torch.nn.functional as F

from bdexp.errors import ConfigError
from bdexp.options import Options, option
from bdexp.registry import Registry

# name -> factory(in_channels, num_classes, mean, std, opts: ModelOptions) -> FeatureModel
MODELS: Registry[Callable[..., "FeatureModel"]] = Registry("model")

# Feature levels every model returns, in forward order (ML-MMDR App. A); `Level` is the type an
# option naming a level declares.
Level = Literal["s1", "s2", "s3", "penult"]
LEVELS: tuple[str, ...] = get_args(Level)


@dataclass(frozen=True)
class ModelOptions(Options):
    """The options every model declares (conf/model/*.yaml)."""

    width: float = option(1.0, lo=0, lo_open=True)  # channel multiplier on every layer's width

Features = dict[str, torch.Tensor]


class FeatureModel(nn.Module):
    """Base class: subclasses set `stage1..3`, `head` (s3 map -> (N, D) vector) and `fc`, then call `_finish`.

    Inputs are float images in [0, 1], NCHW; the model normalizes them with its own per-channel
    `mean`/`std` buffers (project convention: models own any normalization).
    """

    stage1: nn.Module
    stage2: nn.Module
    stage3: nn.Module
    head: nn.Module
    fc: nn.Linear
    s3_channel_mask: torch.Tensor

    def __init__(self, in_channels: int, num_classes: int, mean: Sequence[float], std: Sequence[float]):
        super().__init__()
        if int(in_channels) < 1:
            raise ConfigError(f"model in_channels must be >= 1, got {in_channels}")
        if int(num_classes) < 2:
            raise ConfigError(f"model num_classes must be >= 2, got {num_classes}")
        self.in_channels = int(in_channels)
        self.num_classes = int(num_classes)
        std_t = _channel_stats(std, self.in_channels, "std")
        if not bool((std_t > 0).all()):
            raise ConfigError(f"model std must be positive, got {list(std)}")
        self.register_buffer("mean", _channel_stats(mean, self.in_channels, "mean"))
        self.register_buffer("std", std_t)

    def _finish(self, s3_channels: int) -> None:
        """Add the s3 pruning mask; subclasses call this once their layers exist."""
        # Neural Cleanse neuron pruning (ML-MMDR §6.2, Fig. 10) zeroes entries; all ones = no effect.
        # Contract: stage3 ends in its last activation and `head` maps a zero channel to zero
        # (pooling/max-pool only), so a pruned channel is zero in what `fc` consumes.
        self.register_buffer("s3_channel_mask", torch.ones(int(s3_channels)))

    @property
    def s3_channels(self) -> int:
        """Number of channels of the s3 feature map (the length of `s3_channel_mask`)."""
        return int(self.s3_channel_mask.numel())

    def normalize(self, x: torch.Tensor) -> torch.Tensor:
        """Map [0, 1] images to the normalized input the layers expect."""
        if x.dim() != 4 or x.shape[1] != self.in_channels:
            raise ValueError(f"expected (N, {self.in_channels}, H, W) images, got shape {tuple(x.shape)}")
        if not x.is_floating_point():
            raise TypeError(f"expected float images in [0, 1], got dtype {x.dtype}")
        mean = self.mean.to(dtype=x.dtype).view(1, -1, 1, 1)
        std = self.std.to(dtype=x.dtype).view(1, -1, 1, 1)
        return (x - mean) / std

    @overload
    def forward(self, x: torch.Tensor, features: Literal[False] = ...) -> torch.Tensor: ...

    @overload
    def forward(self, x: torch.Tensor, features: Literal[True]) -> tuple[torch.Tensor, Features]: ...

    def forward(self, x: torch.Tensor, features: bool = False) -> torch.Tensor | tuple[torch.Tensor, Features]:
        """Logits (N, num_classes); with `features=True` also {s1, s2, s3, penult}, each (N, D)."""
        if not features:
            return self.feature_maps(x, logits_only=True)
        logits, maps = self.feature_maps(x)
        return logits, {level: value.flatten(1) for level, value in maps.items()}

    def feature_maps(self, x: torch.Tensor, logits_only: bool = False):
        """(logits, {s1, s2, s3: (N, C, H, W) maps, penult: (N, D)}): the levels unflattened, for
        defenses that work on channels and positions (attention maps: NAD, Li et al. 2021 §3)."""
        s1 = self.stage1(self.normalize(x))
        s2 = self.stage2(s1)
        s3 = self.stage3(s2)
        s3 = s3 * self.s3_channel_mask.to(dtype=s3.dtype).view(1, -1, 1, 1)
        penult = self.head(s3)
        logits = self.fc(penult)
        if logits_only:
            return logits
        return logits, {"s1": s1, "s2": s2, "s3": s3, "penult": penult}


def _channel_stats(values: Sequence[float] | float, channels: int, what: str) -> torch.Tensor:
    """Per-channel normalization stats as a float32 (C,) tensor; one value is broadcast to all channels."""
    if isinstance(values, (int, float)):
        values = [float(values)]
    vals = [float(v) for v in values]
    if len(vals) == 1:
        vals = vals * channels
    if len(vals) != channels:
        raise ConfigError(f"model {what} has {len(vals)} values but the images have {channels} channels")
    return torch.tensor(vals, dtype=torch.float32)


def scaled(channels: int, width: float) -> int:
    """Channel count `channels` scaled by the `width` multiplier (at least 1)."""
    return max(1, int(round(channels * width)))


class SafeMaxPool2d(nn.Module):
    """2×2/stride-2 max-pool that leaves a spatial dimension of size 1 unpooled (so inputs down to 8 px work)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        kh = 2 if x.shape[-2] >= 2 else 1
        kw = 2 if x.shape[-1] >= 2 else 1
        if kh == 1 and kw == 1:
            return x
        return F.max_pool2d(x, kernel_size=(kh, kw), stride=(kh, kw))


class PoolFlatten(nn.Sequential):
    """Global average pool to 1×1 and flatten: the (N, C) penultimate vector."""

    def __init__(self, *before: nn.Module):
        super().__init__(*before, nn.AdaptiveAvgPool2d(1), nn.Flatten(1))


def conv3x3(in_ch: int, out_ch: int, stride: int = 1) -> nn.Conv2d:
    """3×3 convolution with padding 1 and no bias (a BatchNorm follows or precedes it)."""
    return nn.Conv2d(in_ch, out_ch, kernel_size=3, stride=stride, padding=1, bias=False)


def kaiming_init(model: nn.Module, linear_std: float | None = None, fan_mode: str = "fan_out") -> None:
    """He et al. (2015) init for convs, BN to identity; Linear ~ N(0, linear_std²) or PyTorch's default if None."""
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode=fan_mode, nonlinearity="relu")
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, (nn.BatchNorm2d, nn.GroupNorm)):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Linear) and linear_std is not None:
            nn.init.normal_(m.weight, 0.0, linear_std)
            nn.init.zeros_(m.bias)
