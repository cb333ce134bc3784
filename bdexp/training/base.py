"""A training regime is a loss over a batch; the loop (loop.py) is shared by all regimes."""
from __future__ import annotations

import torch
from omegaconf import OmegaConf
from torch import nn

from bdexp.data.loader import Batch
from bdexp.registry import Registry

# name -> class(cfg_train, attack=Attack) with .loss(model, batch) -> (loss, logits)
REGIMES: Registry = Registry("training regime")


class Regime:
    """Cross-entropy over the whole batch; subclasses add terms (MMD, adversarial examples).

    `attack` is there for regimes that model the attacker (ML-MMDR needs the target class).
    `reads_poison_flags`: the loss reads `batch.poison` (which rows the attacker poisoned), so
    only the attacker can train with it; a defender's retraining refuses such a regime
    (training/defender.py)."""

    reads_poison_flags: bool = False

    def __init__(self, cfg, attack=None):
        self.cfg = cfg
        self.attack = attack

    @classmethod
    def cache_identity(cls, cfg) -> dict:
        """What a model trained under `cfg` depends on (the cache key); regimes drop keys that
        cannot change the model."""
        return OmegaConf.to_container(cfg, resolve=True)

    def begin_epoch(self) -> None:
        """Called by the loop before each epoch; regimes with per-batch diagnostics reset them."""

    def epoch_stats(self) -> dict[str, float]:
        """Per-epoch diagnostics the loop appends to the training history (one list per key)."""
        return {}

    def loss(self, model: nn.Module, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
        logits = model(batch.x)
        return nn.functional.cross_entropy(logits, batch.y), logits
