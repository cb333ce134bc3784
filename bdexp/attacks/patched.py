"""`patched` (BadNets): x' = (1 − m)⊙x + m⊙b with m a small square mask (Gu et al., BadNets).

Defaults (our choice, after BadNets): a 3×3 checkerboard touching the bottom-right corner. Works for any
channel count; the checkerboard/white/black patterns are the same in every channel.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch

from bdexp.attacks.base import ATTACKS, Attack, AttackOptions
from bdexp.errors import ConfigError
from bdexp.options import option


@dataclass(frozen=True)
class PatchedOptions(AttackOptions):
    size: int = option(3, lo=1)  # patch side in pixels
    location: Literal["bottom_right", "bottom_left", "top_left", "top_right", "random"] = "bottom_right"
    pattern: Literal["checkerboard", "white", "black", "random"] = "checkerboard"
    margin: int = option(0, lo=0)  # pixels between the patch and the corner


@ATTACKS.register("patched")
class PatchedAttack(Attack):
    name = "patched"
    Options = PatchedOptions

    def build(self, generator: torch.Generator) -> None:
        c, h, w = self.image_shape
        size, margin = self.opts.size, self.opts.margin
        location, pattern = self.opts.location, self.opts.pattern
        if size + margin > min(h, w):
            raise ConfigError(f"attack.size + attack.margin = {size + margin} does not fit a {h}×{w} image")

        if location == "random":  # one seeded position, kept inside the image (margin ignored)
            top = int(torch.randint(0, h - size + 1, (1,), generator=generator))
            left = int(torch.randint(0, w - size + 1, (1,), generator=generator))
        else:
            top = margin if location.startswith("top") else h - size - margin
            left = margin if location.endswith("left") else w - size - margin
        self.top, self.left, self.size = top, left, size

        if pattern == "checkerboard":  # white where (i + j) is even: white corners
            ij = torch.arange(size)[:, None] + torch.arange(size)[None, :]
            patch = ((ij % 2) == 0).float().expand(c, size, size)
        elif pattern == "white":
            patch = torch.ones(c, size, size)
        elif pattern == "black":
            patch = torch.zeros(c, size, size)
        else:  # seeded uniform noise per channel and pixel
            patch = torch.rand(c, size, size, generator=generator)
        self.patch = patch.contiguous()
        # full-size pattern b and mask m, so G is literally (1 − m)⊙x + m⊙b
        self.mask = torch.zeros(h, w, dtype=torch.bool)
        self.mask[top : top + size, left : left + size] = True
        self.pattern = torch.zeros(c, h, w)
        self.pattern[:, top : top + size, left : left + size] = self.patch

    def apply_trigger(self, x: torch.Tensor) -> torch.Tensor:
        out = x.clone()
        s = self.size
        out[:, :, self.top : self.top + s, self.left : self.left + s] = self.patch.to(x.device, x.dtype)
        return out

    def trigger_mask(self) -> torch.Tensor:
        return self.mask.clone()
