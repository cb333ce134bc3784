"""`warped` (WaNet): x' = W(x, b), resampling with a fixed random smooth warp (Nguyen & Tran, WaNet).

The warp: a k×k control grid of uniform[-1, 1] offsets, normalized by its mean absolute value,
upsampled bicubically to H×W (align_corners=True), scaled by s/H, added to the identity sampling
grid and clamped to [-1, 1]. Defaults follow WaNet: k = 4, s = 0.5; CD used k = 32 without
noise mode.

Noise mode (WaNet's "cross" samples): `poison_train` also marks round(cross_ratio × n_poison)
non-poisoned samples as `cross`; each time they appear in a batch `train_batch_hook` warps them
with the backdoor grid plus fresh uniform[-1, 1]/H noise per grid point, and they keep their
labels, so the model learns that only the exact warp carries the backdoor.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from bdexp.attacks.base import ATTACKS, Attack, AttackOptions
from bdexp.options import option


@dataclass(frozen=True)
class WarpedOptions(AttackOptions):
    grid_k: int = option(4, lo=2)  # control-grid side k
    strength: float = option(0.5, lo=0)  # warp strength s
    noise_mode: bool = False
    cross_ratio: float = option(2, lo=0)  # noise mode: n_cross = round(cross_ratio * n_poison)


@ATTACKS.register("warped")
class WarpedAttack(Attack):
    name = "warped"
    Options = WarpedOptions

    def build(self, generator: torch.Generator) -> None:
        k, s = self.opts.grid_k, self.opts.strength
        self.noise_mode, self.cross_ratio = self.opts.noise_mode, self.opts.cross_ratio
        _, h, w = self.image_shape
        ctrl = torch.rand(1, 2, k, k, generator=generator) * 2 - 1
        ctrl = ctrl / ctrl.abs().mean()
        offset = F.interpolate(ctrl, size=(h, w), mode="bicubic", align_corners=True)
        offset = offset.permute(0, 2, 3, 1)  # (1, H, W, 2): (x, y) offsets as grid_sample wants
        ys = torch.linspace(-1, 1, h)
        xs = torch.linspace(-1, 1, w)
        gy, gx = torch.meshgrid(ys, xs, indexing="ij")
        identity = torch.stack((gx, gy), dim=-1)[None]  # grid[..., 0] = x (width), [..., 1] = y
        self.grid = (identity + s * offset / h).clamp(-1, 1)  # (1, H, W, 2)

    def _warp(self, x: torch.Tensor, grid: torch.Tensor) -> torch.Tensor:
        # border padding only matters at float error: the clamped grid stays inside the image
        out = F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=True)
        return out.clamp(0.0, 1.0)

    def apply_trigger(self, x: torch.Tensor) -> torch.Tensor:
        grid = self.grid.to(x.device, x.dtype).expand(len(x), -1, -1, -1)
        return self._warp(x, grid)

    def select_cross(self, poison: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        if not self.noise_mode:
            return torch.zeros_like(poison)
        n = int(round(self.cross_ratio * int(poison.sum())))
        return self.draw_unpoisoned(poison, n, generator, f"attack.cross_ratio={self.cross_ratio} (noise mode)")

    def train_batch_hook(
        self, x: torch.Tensor, cross: torch.Tensor, generator: torch.Generator | None = None
    ) -> torch.Tensor:
        """Warp the batch's cross samples with the backdoor grid plus fresh noise (noise mode)."""
        if not self.noise_mode:
            return x
        cross = cross.to(x.device, torch.bool)
        n = int(cross.sum())
        if n == 0:
            return x
        _, h, w = self.image_shape
        gen_device = generator.device if generator is not None else x.device
        noise = torch.rand(n, h, w, 2, generator=generator, device=gen_device).to(x.device, x.dtype)
        grid = (self.grid.to(x.device, x.dtype) + (noise * 2 - 1) / h).clamp(-1, 1)
        out = x.clone()
        out[cross] = self._warp(x[cross], grid)
        return out
