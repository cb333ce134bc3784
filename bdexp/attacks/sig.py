"""`sig`: x' = clip(x + b), b(i, j) = Δ·sin(2π j f / W), a horizontal sinusoid (Barni et al.).

Defaults Δ = 20/255, f = 6 (after Barni et al.'s SIG). The signal is the same in
every row and channel; j is the column index.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from bdexp.attacks.base import ATTACKS, Attack, AttackOptions
from bdexp.options import option


@dataclass(frozen=True)
class SigOptions(AttackOptions):
    delta: float = option(20 / 255, lo=0, hi=1)  # signal amplitude Δ
    frequency: float = option(6, lo=0, lo_open=True)  # periods f across the image width


@ATTACKS.register("sig")
class SigAttack(Attack):
    name = "sig"
    Options = SigOptions

    def build(self, generator: torch.Generator) -> None:
        c, h, w = self.image_shape
        j = torch.arange(w, dtype=torch.float64)
        row = self.opts.delta * torch.sin(2 * math.pi * j * self.opts.frequency / w)
        self.pattern = row.float().expand(c, h, w).contiguous()  # deterministic: no randomness

    def apply_trigger(self, x: torch.Tensor) -> torch.Tensor:
        return (x + self.pattern.to(x.device, x.dtype)).clamp(0.0, 1.0)
