"""`none`: the clean baseline — no sample is poisoned and the backdoor test set is empty."""
from __future__ import annotations

import torch

from bdexp.attacks.base import ATTACKS, Attack


@ATTACKS.register("none")
class NoAttack(Attack):
    name = "none"
    poisons = False  # poison_train returns the data unchanged; backdoor_test is empty

    def apply_trigger(self, x: torch.Tensor) -> torch.Tensor:
        return x.clone()
