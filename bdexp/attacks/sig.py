"""`sig`: x' = clip(x + b), b(i, j) = Δ·sin(2π j f / W), a horizontal sinusoid (Barni et al.).

Defaults Δ = 20/255, f = 6 (after Barni et al.'s SIG). The signal is the same in
every row and channel; j is the column index.
"""
from __future__ import annotations

import math

import torch

from bdexp.attacks.base import ATTACKS, Attack, _is_number
from bdexp.errors import ConfigError


@ATTACKS.register("sig")
class SigAttack(Attack):
    name = "sig"
    options = {"delta": 20 / 255, "frequency": 6}

    def build(self, generator: torch.Generator) -> None:
        delta, freq = self.cfg["delta"], self.cfg["frequency"]
        if not _is_number(delta) or not 0.0 <= float(delta) <= 1.0:
            raise ConfigError(f"attack.delta={delta!r} must be a number in [0, 1] (signal amplitude)")
        if not _is_number(freq) or float(freq) <= 0:
            raise ConfigError(f"attack.frequency={freq!r} must be a positive number (periods per width)")
        c, h, w = self.image_shape
        j = torch.arange(w, dtype=torch.float64)
        row = float(delta) * torch.sin(2 * math.pi * j * float(freq) / w)
        self.pattern = row.float().expand(c, h, w).contiguous()  # deterministic: no randomness

    def apply_trigger(self, x: torch.Tensor) -> torch.Tensor:
        return (x + self.pattern.to(x.device, x.dtype)).clamp(0.0, 1.0)
