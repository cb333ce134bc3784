"""`blended`: x' = (1 − α)x + αb with b a fixed image (Chen et al. 2017).

b is a seeded uniform-noise image, or the image file `image` (resized to the data's H×W and
converted to its channel count). α = 0.1 follows the ML-MMDR authors' code; CD used 0.2.
"""
from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F

from bdexp.attacks.base import ATTACKS, Attack, _is_number
from bdexp.errors import ConfigError


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


@ATTACKS.register("blended")
class BlendedAttack(Attack):
    name = "blended"
    options = {"alpha": 0.1, "image": None}

    def build(self, generator: torch.Generator) -> None:
        alpha = self.cfg["alpha"]
        if not _is_number(alpha) or not 0.0 <= float(alpha) <= 1.0:
            raise ConfigError(f"attack.alpha={alpha!r} must be a number in [0, 1]")
        self.alpha = float(alpha)
        image = self.cfg["image"]
        if image is None:
            self.pattern = torch.rand(self.image_shape, generator=generator)
        elif isinstance(image, str):
            self.pattern = load_image(image, self.image_shape)
        else:
            raise ConfigError(f"attack.image={image!r} must be null (seeded noise) or an image file path")

    def apply_trigger(self, x: torch.Tensor) -> torch.Tensor:
        b = self.pattern.to(x.device, x.dtype)
        return (1 - self.alpha) * x + self.alpha * b
