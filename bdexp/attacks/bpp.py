"""`bpp` (BppAttack; Wang, Zhai & Ma, "BppAttack: Stealthy and Efficient Trojan Attacks against Deep
Neural Networks via Image Quantization and Contrastive Adversarial Learning", CVPR 2022).

The trigger is no pattern at all: every colour channel is squeezed from 256 to `squeeze_num` evenly
spaced levels k/(squeeze_num − 1), k = 0..squeeze_num − 1 (the paper's "image quantization"), and,
with `dither` (the paper's "dithering"; bdexp's default), the rounding error is spread to the unvisited
neighbours by standard Floyd–Steinberg error diffusion: in raster order each value is rounded to
the nearest level and its error e goes 7/16·e right, 3/16·e below-left, 5/16·e below and 1/16·e
below-right (error falling off the image is dropped). Every image and channel is independent, so
the diffusion runs pixel by pixel vectorized over N·C (1 000 CIFAR-size images: about 0.2 s).

Defaults: squeeze_num = 8 is BackdoorBench's (SCLBD/BackdoorBench config/attack/bpp/default.yaml)
and the authors' code's (RU-System-Software-and-Security/BppAttack config.py, `--squeeze_num 8`).
dither = true follows the paper; both BackdoorBench and the authors' code default to
`dithering: False` (plain rounding), which is `dither: false` here.

Negative samples (the paper's "contrastive adversarial training"): BackdoorBench's attack/bpp.py
(train_step) and the authors' bppattack.py (train) add, in every batch, int(bs·neg_ratio)
samples x_i + (Q(x_j) − x_j) clamped to [0, 255]: the quantization residual of a *different*
training image x_j, drawn afresh every batch (random.sample over the training set in BackdoorBench;
over the precomputed `residual_list_train` in the authors' code), added to x_i, which keeps its TRUE
label. The residual is taken on the 0..255 grid, Q(x_j) rounded to integers as saved images are.
Here: `poison_train` stores that residual of every training row (int8/int16, 0..255 units), marks
round(neg_ratio · N) non-poisoned rows as `cross` (N = the final training set; BackdoorBench's
per-batch int(bs·neg_ratio) is the same share of every batch), and `train_batch_hook` gives each
cross row in a batch the residual of a uniformly drawn training row, fresh every time the row is
seen. neg_ratio = 0.1 is BackdoorBench's default.yaml (its original_default.yaml and the authors'
code use 0.2); neg_ratio = 0 disables the negatives. Differences: BackdoorBench/the authors pick
which rows of a batch become negatives anew every batch (here a fixed set of rows, as WaNet's noise
mode in bdexp), and they poison pratio of every batch on the fly (here a fixed set of rows, the
`budget` rule of bdexp.attacks.base).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from bdexp.attacks.base import ATTACKS, Attack, AttackOptions, PoisonedTrainSet
from bdexp.options import option

_CHUNK = 4096  # images per residual batch (as bdexp.attacks.base's apply)
# Floyd–Steinberg weights: right, below-left, below, below-right
_FS_RIGHT, _FS_BELOW_LEFT, _FS_BELOW, _FS_BELOW_RIGHT = 7 / 16, 3 / 16, 5 / 16, 1 / 16


def squeeze(x: torch.Tensor, levels: int, dither: bool = True) -> torch.Tensor:
    """Colour-depth squeezing of float NCHW images in [0, 1] to `levels` values per channel,
    k/(levels − 1); with `dither`, Floyd–Steinberg error diffusion in raster order (module
    docstring). Computed in float64 (the reference implementations diffuse in float64) on x's
    device; returns x's dtype."""
    if levels < 2:
        raise ValueError(f"levels must be >= 2, got {levels}")
    top = float(levels - 1)
    v = x.double() * top  # level units: a level is an integer
    if not dither:
        return (v.round().clamp_(0, top) / top).to(x.dtype)
    n, c, h, w = x.shape
    # (H + 1, W + 2, N·C): each pixel's values for every image and channel are one contiguous
    # vector; the extra row and the two extra columns swallow the error that leaves the image.
    buf = torch.zeros(h + 1, w + 2, n * c, dtype=torch.float64, device=x.device)
    buf[:h, 1 : w + 1] = v.permute(2, 3, 0, 1).reshape(h, w, n * c)
    err = torch.empty(w + 2, n * c, dtype=torch.float64, device=x.device)
    new = torch.empty(n * c, dtype=torch.float64, device=x.device)
    # ~5·H·W small ops: on CPU, intra-op threads only add their wake-up cost to each (measured
    # ×40 slower on a loaded 2-core machine), so the loop runs single-threaded
    threads = torch.get_num_threads()
    single = x.device.type == "cpu" and threads > 1
    if single:
        torch.set_num_threads(1)
    try:
        _diffuse(buf, err, new, h, w, top)
    finally:
        if single:
            torch.set_num_threads(threads)
    out = buf[:h, 1 : w + 1].reshape(h, w, n, c).permute(2, 3, 0, 1)
    return (out / top).to(x.dtype).contiguous()


def _diffuse(buf: torch.Tensor, err: torch.Tensor, new: torch.Tensor, h: int, w: int, top: float) -> None:
    """Floyd–Steinberg in place on buf (H + 1, W + 2, M) in level units (see `squeeze`)."""
    for i in range(h):
        row, below = buf[i], buf[i + 1]
        err.zero_()
        for j in range(1, w + 1):
            old = row[j]
            torch.round(old, out=new).clamp_(0, top)
            torch.sub(old, new, out=err[j])
            old.copy_(new)
            row[j + 1].add_(err[j], alpha=_FS_RIGHT)
        # the whole row's errors go to the next row at once (its values are not read before)
        below[:w].add_(err[1 : w + 1], alpha=_FS_BELOW_LEFT)  # from (i, j) to (i + 1, j − 1)
        below[1 : w + 1].add_(err[1 : w + 1], alpha=_FS_BELOW)
        below[2 : w + 2].add_(err[1 : w + 1], alpha=_FS_BELOW_RIGHT)


@dataclass(frozen=True)
class BppOptions(AttackOptions):
    squeeze_num: int = option(8, lo=2, hi=256)  # levels per channel
    dither: bool = True  # Floyd–Steinberg dithering (paper); false: plain rounding (BackdoorBench/authors' default)
    neg_ratio: float = option(0.1, lo=0, hi=1)  # negatives: round(neg_ratio·N) non-poisoned rows


@ATTACKS.register("bpp")
class BppAttack(Attack):
    name = "bpp"
    Options = BppOptions

    def build(self, generator: torch.Generator) -> None:
        self.squeeze_num, self.dither, self.neg_ratio = self.opts.squeeze_num, self.opts.dither, self.opts.neg_ratio
        self._residuals: torch.Tensor | None = None  # (N, C, H, W) Q(x) − x on 0..255, set by poison_train
        self._on_device: dict[torch.device, torch.Tensor] = {}

    def apply_trigger(self, x: torch.Tensor) -> torch.Tensor:
        return squeeze(x, self.squeeze_num, self.dither)

    # ------------------------------------------------------------ negative samples
    def residuals(self, x: torch.Tensor) -> torch.Tensor:
        """Q(x) − x on the 0..255 grid (Q(x) rounded as a saved image is), as a small int tensor."""
        # |r| <= one level step (dithering) + rounding: int8 holds it from 4 levels up
        dtype = torch.int8 if 255 / (self.squeeze_num - 1) + 1 <= 127 else torch.int16
        parts = []
        for chunk in x.split(_CHUNK):  # bounded float memory on full-size sets
            q = (self.apply_trigger(chunk).clamp(0, 1) * 255).round()
            parts.append((q - (chunk.clamp(0, 1) * 255).round()).to(dtype))
        return torch.cat(parts) if parts else torch.zeros(0, *x.shape[1:], dtype=dtype, device=x.device)

    def poison_train(self, x: torch.Tensor, y: torch.Tensor) -> PoisonedTrainSet:
        self._residuals, self._on_device = None, {}
        if self.neg_ratio > 0:
            self._check_images(x, y)
            self._residuals = self.residuals(x).cpu()  # of the clean rows, before any poisoning
        return super().poison_train(x, y)

    def select_cross(self, poison: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        n = int(round(self.neg_ratio * len(poison)))
        return self.draw_unpoisoned(poison, n, generator, f"attack.neg_ratio={self.neg_ratio} (negative samples)")

    def train_batch_hook(
        self, x: torch.Tensor, cross: torch.Tensor, generator: torch.Generator | None = None
    ) -> torch.Tensor:
        """Each cross row gets the quantization residual of a uniformly drawn training row, fresh
        every call; labels are the loader's (the true ones)."""
        cross = cross.to(x.device, torch.bool)
        n = int(cross.sum())
        if n == 0 or self.neg_ratio == 0:
            return x
        if self._residuals is None:
            raise RuntimeError("bpp: train_batch_hook called before poison_train built the residuals")
        bank = self._on_device.get(x.device)
        if bank is None:
            bank = self._on_device[x.device] = self._residuals.to(x.device)
        gen_device = generator.device if generator is not None else x.device
        donors = torch.randint(len(bank), (n,), generator=generator, device=gen_device).to(x.device)
        out = x.clone()
        out[cross] = (x[cross] + bank[donors].to(x.dtype) / 255).clamp(0, 1)
        return out
