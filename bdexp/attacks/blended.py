"""`blended`: x' = (1 − α)x + αb with b a fixed image (Chen et al. 2017).

b is a seeded uniform-noise image, or the image file `image` (resized to the data's H×W and
converted to its channel count). α = 0.1 follows the ML-MMDR authors' code; CD used 0.2.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from bdexp.attacks.base import ATTACKS, Attack, AttackOptions
from bdexp.errors import ConfigError
from bdexp.options import option


def load_image(path: str, shape: tuple[int, int, int]) -> torch.Tensor:
    """Read an image file as float (C, H, W) in [0, 1] at the given shape."""
    from hydra.utils import to_absolute_path  # relative paths are relative to the launch dir
    from PIL import Image

    p = Path(to_absolute_path(str(Path(path).expanduser())))
    if not p.is_file():
        raise ConfigError(f"attack.image={path!r}: no such file ({p})")
    c, h, w = shape
    with Image.open(p) as img:
        img = img.convert("L" if c == 1 else "RGB")
        data = torch.frombuffer(bytearray(img.tobytes()), dtype=torch.uint8)
        t = data.view(img.height, img.width, -1).permute(2, 0, 1).float() / 255.0
    if c not in (1, 3):
        t = t.mean(0, keepdim=True).expand(c, -1, -1)
    t = F.interpolate(t[None], size=(h, w), mode="bilinear", align_corners=False, antialias=True)[0]
    return t.clamp(0, 1).contiguous()


@dataclass(frozen=True)
class BlendedOptions(AttackOptions):
    alpha: float = option(0.1, lo=0, hi=1)  # blend ratio α
    image: str | None = None  # null: b = seeded uniform noise; or an image file


@ATTACKS.register("blended")
class BlendedAttack(Attack):
    name = "blended"
    Options = BlendedOptions

    def build(self, generator: torch.Generator) -> None:
        self.alpha = self.opts.alpha
        if self.opts.image is None:
            self.pattern = torch.rand(self.image_shape, generator=generator)
        else:
            self.pattern = load_image(self.opts.image, self.image_shape)

    def apply_trigger(self, x: torch.Tensor) -> torch.Tensor:
        b = self.pattern.to(x.device, x.dtype)
        return (1 - self.alpha) * x + self.alpha * b
