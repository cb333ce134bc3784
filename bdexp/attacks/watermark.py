"""`watermark`: ISPL's WATERMARK attack (ISPL §4.1, App. B).

An 8×8 mark with a transparent background is blended into the upper-left corner at 80 % opacity:
x' = (1 − o·a)⊙x + o·a⊙mark, with a the mark's alpha and o the opacity (0 % returns the original
image, 100 % superimposes the mark). Otherwise built like `dlbd`: dirty label, 1-to-1 by default
with ISPL's (source, target) scenarios and ε the fraction of the source class.

**Gap**: ISPL's marks (a peace sign, the letter A, three bullet holes, a colourful patch) are image
files from Nicolae et al. (2019, ART) that the paper does not reproduce. They are drawn here
procedurally: each mark is a set of geometric shapes in the unit square, rasterised at `size`×`size`
with 4×4 supersampling, so alpha is soft (the fraction of a pixel the mark covers) and the colour
is the mean colour of the covered sub-samples. The colours are our choice.
"""
from __future__ import annotations

import math
import typing
from dataclasses import dataclass
from typing import Literal

import torch

from bdexp.attacks.base import ATTACKS
from bdexp.attacks.scenarios import ScenarioAttack, ScenarioOptions
from bdexp.errors import ConfigError
from bdexp.options import option

Mark = Literal["peace", "letter_a", "bullet_holes", "colour_patch"]
MARKS: tuple[str, ...] = typing.get_args(Mark)
_SUPERSAMPLE = 4


def _segment_distance(u: torch.Tensor, v: torch.Tensor, a: tuple[float, float], b: tuple[float, float]) -> torch.Tensor:
    """Distance from points (u, v) to the segment a-b (unit-square coordinates)."""
    du, dv = b[0] - a[0], b[1] - a[1]
    t = (((u - a[0]) * du + (v - a[1]) * dv) / (du * du + dv * dv)).clamp(0, 1)
    return torch.hypot(u - (a[0] + t * du), v - (a[1] + t * dv))


def _hue_to_rgb(hue: torch.Tensor) -> torch.Tensor:
    """Fully saturated colours for hues in [0, 1): (..., 3)."""
    k = (torch.stack([hue * 6 + 5, hue * 6 + 3, hue * 6 + 1], dim=-1)) % 6  # HSV with s = v = 1
    return 1 - torch.clamp(torch.minimum(k, 4 - k), 0, 1)


def _mark_samples(mark: str, u: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Coverage (bool) and RGB colour (..., 3) of a mark at unit-square points u (→ right), v (↓ down)."""
    colour = torch.zeros(*u.shape, 3)
    if mark == "peace":  # a ring, a vertical stem, and two strokes from the centre to the lower ring
        r = torch.hypot(u - 0.5, v - 0.5)
        half = 0.075
        inside = (r - 0.39).abs() < half
        inner = r < 0.39
        inside |= inner & (_segment_distance(u, v, (0.5, 0.1), (0.5, 0.9)) < half)
        d = 0.39 / math.sqrt(2)
        for sign in (-1.0, 1.0):
            inside |= inner & (_segment_distance(u, v, (0.5, 0.5), (0.5 + sign * d, 0.5 + d)) < half)
        colour[:] = torch.tensor([0.95, 0.95, 0.95])  # white
    elif mark == "letter_a":  # two legs from an apex and a crossbar
        half = 0.08
        apex, left, right = (0.5, 0.06), (0.12, 0.94), (0.88, 0.94)
        inside = _segment_distance(u, v, apex, left) < half
        inside |= _segment_distance(u, v, apex, right) < half
        inside |= _segment_distance(u, v, (0.29, 0.62), (0.71, 0.62)) < half
        colour[:] = torch.tensor([0.9, 0.1, 0.1])  # red
    elif mark == "bullet_holes":  # three holes: a dark core in a lighter, torn rim
        inside = torch.zeros_like(u, dtype=torch.bool)
        core = torch.zeros_like(inside)
        for cu, cv in ((0.26, 0.28), (0.72, 0.32), (0.42, 0.74)):
            r = torch.hypot(u - cu, v - cv)
            inside |= r < 0.2
            core |= r < 0.11
        colour[:] = torch.tensor([0.55, 0.55, 0.55])
        colour[core] = torch.tensor([0.05, 0.05, 0.05])
    elif mark == "colour_patch":  # an opaque square with a diagonal rainbow
        inside = (u > 0.125) & (u < 0.875) & (v > 0.125) & (v < 0.875)
        colour = _hue_to_rgb(((u + v - 0.25) / 1.5).clamp(0, 0.999) * 0.85)
    else:
        raise ConfigError(f"attack.mark={mark!r} is not allowed; choose one of {list(MARKS)}")
    return inside, colour


def draw_mark(mark: str, size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(alpha (size, size) in [0, 1], colour (3, size, size) in [0, 1]) of a procedural mark."""
    s, n = size, _SUPERSAMPLE
    coords = (torch.arange(s * n, dtype=torch.float32) + 0.5) / (s * n)
    v, u = torch.meshgrid(coords, coords, indexing="ij")
    inside, colour = _mark_samples(mark, u, v)
    cover = inside.float().view(s, n, s, n)
    alpha = cover.mean(dim=(1, 3))
    rgb = (colour * inside[..., None]).view(s, n, s, n, 3).sum(dim=(1, 3))
    rgb = rgb / cover.sum(dim=(1, 3)).clamp_min(1)[..., None]  # mean over covered sub-samples
    return alpha, rgb.permute(2, 0, 1).clamp(0, 1).contiguous()


@dataclass(frozen=True)
class WatermarkOptions(ScenarioOptions):
    mark: Mark = "peace"
    opacity: float = option(0.8, lo=0, hi=1)  # ISPL: 80 %
    size: int = option(8, lo=1)  # mark side in pixels (ISPL: 8)
    location: Literal["top_left", "top_right", "bottom_left", "bottom_right"] = "top_left"


@ATTACKS.register("watermark")
class WatermarkAttack(ScenarioAttack):
    name = "watermark"
    Options = WatermarkOptions

    def build(self, generator: torch.Generator) -> None:
        c, h, w = self.image_shape
        mark, opacity = self.opts.mark, self.opts.opacity
        size, location = self.opts.size, self.opts.location
        if size > min(h, w):
            raise ConfigError(f"attack.size={size} does not fit a {h}×{w} image")
        # The mark is fixed (no randomness): `generator` is unused, the scenario only sets the labels.
        alpha, rgb = draw_mark(mark, size)
        if c == 1:  # grey images: luminance of the colour mark
            rgb = (0.299 * rgb[0] + 0.587 * rgb[1] + 0.114 * rgb[2])[None]
        elif c != 3:
            rgb = rgb.mean(0, keepdim=True).expand(c, -1, -1).contiguous()
        self.opacity = opacity
        self.size = size
        self.top = 0 if location.startswith("top") else h - size
        self.left = 0 if location.endswith("left") else w - size
        self.alpha: torch.Tensor = alpha  # (size, size)
        self.mark: torch.Tensor = rgb  # (C, size, size)
        self.weight: torch.Tensor = self.opacity * alpha  # o·a, the per-pixel blend weight
        self.mask = torch.zeros(h, w, dtype=torch.bool)
        self.mask[self.top : self.top + size, self.left : self.left + size] = alpha > 0

    def apply_trigger(self, x: torch.Tensor) -> torch.Tensor:
        out = x.clone()
        t, l, s = self.top, self.left, self.size
        a = self.weight.to(x.device, x.dtype)
        b = self.mark.to(x.device, x.dtype)
        out[:, :, t : t + s, l : l + s] = (1 - a) * x[:, :, t : t + s, l : l + s] + a * b
        return out

    def trigger_mask(self) -> torch.Tensor:
        return self.mask.clone()
