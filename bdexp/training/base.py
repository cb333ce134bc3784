"""A training regime is a loss over a batch; the loop (loop.py) is shared by all regimes.

Each regime declares its options as a `Schedule` subclass (`Regime.Options`): the SGD schedule
every regime shares (conf/train/_schedule.yaml, which each conf/train/*.yaml inherits) plus the
keys of its loss.
"""
from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import ClassVar

import torch
from omegaconf import DictConfig, OmegaConf
from torch import nn

from bdexp.data.loader import Batch
from bdexp.options import Options, option
from bdexp.registry import Registry

# name -> class(cfg_train, attack=Attack) with .loss(model, batch) -> (loss, logits); its
# `Options` is the declaration registered with it
REGIMES: Registry = Registry("training regime")


@dataclass(frozen=True)
class Schedule(Options):
    """SGD with momentum and a step schedule (ML-MMDR §3.4: momentum 0.9, wd 5e-4, batch 256, lr
    0.01 dropped x0.1 at epochs 50 and 70 of 100 on CIFAR-10); conf/train/_schedule.yaml."""

    epochs: int = option(100, lo=1)
    batch_size: int = option(256, lo=1)
    lr: float = option(0.01, lo=0, lo_open=True)
    momentum: float = option(0.9, lo=0, hi=1)
    weight_decay: float = option(5.0e-4, lo=0)
    nesterov: bool = False
    milestones: tuple[float, ...] = option([0.5, 0.7], lo=0, hi=1)  # fractions of `epochs` (loop.py)
    gamma: float = option(0.1, lo=0, lo_open=True)  # lr multiplier at each milestone
    amp: bool = True  # bf16 autocast, CUDA only
    compile: bool = False  # torch.compile the model (CUDA)
    log_every: int = option(10, lo=1)  # steps between progress-bar refreshes

    @classmethod
    def of(cls, cfg) -> "Schedule":
        """The schedule of a train config of any regime (its loss keys are left to the regime)."""
        if isinstance(cfg, Schedule):
            return cfg
        raw = (OmegaConf.to_container(cfg, resolve=True) if isinstance(cfg, DictConfig)
               else cfg if isinstance(cfg, Mapping) else vars(cfg))
        return cls.parse({k: raw[k] for k in cls.fields() if k in raw}, "train")


class Regime:
    """Cross-entropy over the whole batch; subclasses add terms (MMD, adversarial examples).

    `attack` is there for regimes that model the attacker (ML-MMDR needs the target class).
    `reads_poison_flags`: the loss reads `batch.poison` (which rows the attacker poisoned), so
    only the attacker can train with it; a defender's retraining refuses such a regime
    (training/defender.py). `opts`: the train config parsed by the regime's `Options`."""

    Options: ClassVar[type[Schedule]] = Schedule
    reads_poison_flags: bool = False

    def __init__(self, cfg, attack=None):
        self.opts = self.Options.parse(cfg, "train")
        self.attack = attack

    @classmethod
    def cache_identity(cls, cfg) -> dict:
        """What a model trained under `cfg` depends on (the cache key); regimes drop keys that
        cannot change the model."""
        return OmegaConf.to_container(cfg, resolve=True)

    @classmethod
    def collapse_hint(cls, cfg) -> str:
        """What to try when a model trained under `cfg` predicts one class for (nearly) every clean
        test image (pipeline.warn_if_collapsed); empty when the regime has no setting to blame."""
        return ""

    def begin_epoch(self) -> None:
        """Called by the loop before each epoch; regimes with per-batch diagnostics reset them."""

    def epoch_stats(self) -> dict[str, float]:
        """Per-epoch diagnostics the loop appends to the training history (one list per key)."""
        return {}

    def loss(self, model: nn.Module, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
        logits = model(batch.x)
        return nn.functional.cross_entropy(logits, batch.y), logits
