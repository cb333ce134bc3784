"""`dlbd`: ISPL's dirty-label backdoor (ISPL §4.1, App. B; after Gu et al. / Tran et al.).

Per scenario, a perturbation is drawn once: a shape chosen uniformly among {pixel, X, L} (all fit
within a 3×3 box), a position chosen uniformly so the whole shape is inside the image ("the X-shape
... must be centered in a 30x30 region, one pixel away from the border" on 32×32), and a colour
with each channel drawn uniformly from 0..254 (÷255). The trigger *replaces* those pixels:
x' = x with the shape's pixels set to the colour. Poisoned samples are relabelled to the target
(dirty label); by default 1-to-1 with ε of the source class poisoned (ISPL ε ∈ {5, 10, 20} %).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch

from bdexp.attacks.base import ATTACKS
from bdexp.attacks.scenarios import ScenarioAttack, ScenarioOptions
from bdexp.errors import ConfigError

# (row, col) offsets of each shape inside its bounding box. ISPL: "All patterns fit within a 3x3
# pixel box"; pixel = 1 px, X = the 5 px of a 3×3 X (corners + centre), L = 3 px in a 2×2 box.
SHAPES: dict[str, tuple[tuple[int, int], ...]] = {
    "pixel": ((0, 0),),
    "X": ((0, 0), (0, 2), (1, 1), (2, 0), (2, 2)),
    "L": ((0, 0), (1, 0), (1, 1)),
}
SHAPE_NAMES = tuple(SHAPES)  # draw order: index drawn uniformly in [0, 3)


def shape_box(offsets: tuple[tuple[int, int], ...]) -> tuple[int, int]:
    """(height, width) of a shape's bounding box."""
    return 1 + max(r for r, _ in offsets), 1 + max(c for _, c in offsets)


@dataclass(frozen=True)
class DlbdOptions(ScenarioOptions):
    shape: Literal["pixel", "X", "L"] | None = None  # null: drawn uniformly from SHAPES, as ISPL


@ATTACKS.register("dlbd")
class DirtyLabelBackdoor(ScenarioAttack):
    name = "dlbd"
    Options = DlbdOptions

    def build(self, generator: torch.Generator) -> None:
        c, h, w = self.image_shape
        forced = self.opts.shape
        # Deterministic per (seed, scenario): every draw below comes from this generator, in a
        # fixed order (shape, position, colour); the shape index is drawn even when forced.
        g = self.scenario_generator(generator)
        drawn = SHAPE_NAMES[int(torch.randint(0, len(SHAPE_NAMES), (1,), generator=g))]
        shape = forced if forced is not None else drawn
        offsets = SHAPES[shape]
        bh, bw = shape_box(offsets)
        if bh > h or bw > w:
            raise ConfigError(f"attack.shape={shape!r} ({bh}×{bw} box) does not fit a {h}×{w} image")
        # Position of the bounding box's top-left corner: the whole shape stays visible (ISPL App. B).
        top = int(torch.randint(0, h - bh + 1, (1,), generator=g))
        left = int(torch.randint(0, w - bw + 1, (1,), generator=g))
        # Colour: each channel uniform in 0..254, as the authors' code (ISPL says 0..255; the reference code's
        # exclusive upper bound gives 0..254). One grey value for 1-channel images.
        colour = torch.randint(0, 255, (c,), generator=g).float() / 255.0

        self.shape: str = shape
        self.top, self.left = top, left
        self.colour: torch.Tensor = colour
        self.rows = torch.tensor([top + r for r, _ in offsets], dtype=torch.long)
        self.cols = torch.tensor([left + q for _, q in offsets], dtype=torch.long)
        # Full-size mask m and pattern b, so G is also (1 − m)⊙x + m⊙b (pixels replaced).
        self.mask = torch.zeros(h, w, dtype=torch.bool)
        self.mask[self.rows, self.cols] = True
        self.pattern = torch.zeros(c, h, w)
        self.pattern[:, self.rows, self.cols] = colour[:, None]

    def apply_trigger(self, x: torch.Tensor) -> torch.Tensor:
        out = x.clone()
        rows, cols = self.rows.to(x.device), self.cols.to(x.device)
        out[:, :, rows, cols] = self.colour.to(x.device, x.dtype).view(1, -1, 1)
        return out

    def trigger_mask(self) -> torch.Tensor:
        return self.mask.clone()
