"""A training regime is a loss over a batch; the loop (loop.py) is shared by all regimes."""
from __future__ import annotations

import torch
from torch import nn

from bdexp.data.loader import Batch
from bdexp.registry import Registry

# name -> class(cfg_train) with .loss(model, batch) -> (loss, logits)
REGIMES: Registry = Registry("training regime")


class Regime:
    """Cross-entropy over the whole batch; subclasses add terms (MMD, adversarial examples)."""

    def __init__(self, cfg):
        self.cfg = cfg

    def loss(self, model: nn.Module, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
        logits = model(batch.x)
        return nn.functional.cross_entropy(logits, batch.y), logits
