"""`none`: the clean baseline — no sample is poisoned and the backdoor test set is empty."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from bdexp.attacks.base import ATTACKS, Attack, AttackOptions
from bdexp.options import option


@dataclass(frozen=True)
class NoneOptions(AttackOptions):
    """The common keys, validated but otherwise ignored; nothing is poisoned."""

    poison_rate: float = option(0.0, lo=0, hi=1)


@ATTACKS.register("none")
class NoAttack(Attack):
    name = "none"
    Options = NoneOptions
    poisons = False  # poison_train returns the data unchanged; backdoor_test is empty

    def apply_trigger(self, x: torch.Tensor) -> torch.Tensor:
        return x.clone()
