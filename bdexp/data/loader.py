"""The on-device batch loader (tensors stay on the device, batch-wise augmentation; after airbench).

The whole training set lives on the run's device as uint8; each epoch is one random
permutation, and augmentation (random crop with padding, horizontal flip) is applied to the
whole batch at once with tensor ops. No DataLoader workers, no per-sample Python.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator

import torch
import torch.nn.functional as F


@dataclass
class Batch:
    x: torch.Tensor  # float [0, 1], NCHW, on device
    y: torch.Tensor  # given labels
    poison: torch.Tensor  # bool; only training regimes that model the attacker may read it
    cross: torch.Tensor  # bool; rows the attack changes per batch (WaNet noise mode, BppAttack negatives, IAD cross)
    index: torch.Tensor  # positions in the training set


def to_uint8(x: torch.Tensor) -> torch.Tensor:
    """Quantize float images in [0, 1] to uint8, as a poisoned image saved to disk would be."""
    return (x.clamp(0, 1) * 255).round().to(torch.uint8)


def to_float(x: torch.Tensor) -> torch.Tensor:
    return x.float().div_(255)


def random_crop(x: torch.Tensor, padding: int, generator: torch.Generator) -> torch.Tensor:
    """Batch-wise random translation by up to `padding` px with zero fill (= pad + random crop)."""
    if padding <= 0:
        return x
    n, _, h, w = x.shape
    padded = F.pad(x, (padding,) * 4)
    dy = torch.randint(0, 2 * padding + 1, (n,), device=x.device, generator=generator)
    dx = torch.randint(0, 2 * padding + 1, (n,), device=x.device, generator=generator)
    rows = (dy[:, None] + torch.arange(h, device=x.device)[None, :])  # (n, h)
    cols = (dx[:, None] + torch.arange(w, device=x.device)[None, :])  # (n, w)
    batch = torch.arange(n, device=x.device)[:, None, None, None]
    chan = torch.arange(x.shape[1], device=x.device)[None, :, None, None]
    return padded[batch, chan, rows[:, None, :, None], cols[:, None, None, :]]


def random_flip(x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    flip = torch.rand(x.shape[0], device=x.device, generator=generator) < 0.5
    return torch.where(flip[:, None, None, None], x.flip(-1), x)


class DeviceLoader:
    """Shuffled mini-batches from device-resident tensors, augmented batch-wise."""

    def __init__(
        self,
        x: torch.Tensor,
        y: torch.Tensor,
        poison: torch.Tensor | None = None,
        cross: torch.Tensor | None = None,
        *,
        batch_size: int,
        device: torch.device,
        seed: int,
        crop_padding: int = 0,
        flip: bool = False,
        drop_last: bool = False,
        batch_hook=None,
    ):
        n = len(x)
        self.x = (x if x.dtype == torch.uint8 else to_uint8(x)).to(device)
        self.y = y.to(device)
        self.poison = (poison if poison is not None else torch.zeros(n, dtype=torch.bool)).to(device)
        self.cross = (cross if cross is not None else torch.zeros(n, dtype=torch.bool)).to(device)
        self.batch_size = int(batch_size)
        self.device = device
        self.crop_padding = int(crop_padding)
        self.flip = bool(flip)
        self.drop_last = drop_last and n > self.batch_size
        self.batch_hook = batch_hook
        self.generator = torch.Generator(device=device)
        self.generator.manual_seed(seed)

    def __len__(self) -> int:
        n = len(self.x)
        return n // self.batch_size if self.drop_last else -(-n // self.batch_size)

    def __iter__(self) -> Iterator[Batch]:
        order = torch.randperm(len(self.x), device=self.device, generator=self.generator)
        for i in range(len(self)):
            idx = order[i * self.batch_size : (i + 1) * self.batch_size]
            x = to_float(self.x[idx])
            cross = self.cross[idx]
            if self.batch_hook is not None and bool(cross.any()):
                x = self.batch_hook(x, cross, self.generator)
            x = random_crop(x, self.crop_padding, self.generator)
            if self.flip:
                x = random_flip(x, self.generator)
            yield Batch(x=x, y=self.y[idx], poison=self.poison[idx], cross=cross, index=idx)


def iterate_eval(x: torch.Tensor, batch_size: int, device: torch.device) -> Iterator[torch.Tensor]:
    """Float batches of `x` (uint8 or float) on `device`, in order, without augmentation."""
    for start in range(0, len(x), batch_size):
        chunk = x[start : start + batch_size].to(device, non_blocking=True)
        yield to_float(chunk) if chunk.dtype == torch.uint8 else chunk.float()
