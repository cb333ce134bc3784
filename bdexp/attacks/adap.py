"""`adap_blend` and `adap_patch`: Adaptive-Blend / Adaptive-Patch (Qi, Xie, Li, Mahloujifar & Mittal,
"Revisiting the Assumption of Latent Separability for Backdoor Defenses", ICLR 2023, §4), attacks
built to defeat defenses that assume poisoned and clean samples separate in latent space.

Two devices, both read off the authors' code (vtu81/backdoor-toolbox, poison_tool_box/
adaptive_blend.py and adaptive_patch.py, understood, not copied):
- cover samples ("conservatism"): round(cover_rate · N) rows, disjoint from the payload rows, carry
  the training-time trigger but keep their TRUE label (`cover` = True, `poison` = False); the
  payload rows (`poison` = True) are relabelled to the target. Both rates are fractions of the whole
  training set N, as the authors' `int(num_img · rate)` (bdexp rounds instead of truncating; the
  payload rows follow bdexp's `budget` rule, i.e. are drawn among non-target rows for all_to_one,
  where the authors draw among all rows; covers are drawn among all non-payload rows, as theirs).
- a weaker, diversified trigger at training time than at test time:
  * adap_blend: the blend image b is cut into `pieces` = g×g equal tiles (a 4×4 grid); for every
    training sample (payload or cover) a fresh random round(mask_rate · pieces) of the tiles are
    masked out and x' = x + train_alpha · m ⊙ (b − x) on the others; the test trigger is the whole
    image at test_alpha: x' = x + test_alpha · (b − x). Defaults pieces = 16, mask_rate = 0.5
    (create_poisoned_set.py passes `pieces=16, mask_rate=0.5`), train_alpha = 0.15 and
    test_alpha = 0.2 (the README's CIFAR-10 commands `-alpha 0.15 ... -test_alpha 0.2`).
    Tile boundaries are ⌊i·H/g⌋ (the authors require H divisible by g; this is the same tiling then).
  * adap_patch: k patch triggers (mark_j, mask_j) with their own training opacities
    train_alphas = (0.5, 0.2, 0.5, 0.3) (config.py `adaptive_patch_train_trigger_alphas['cifar10']`,
    k = 4); each training sample gets `per_sample` = 1 of them: the authors give the j-th trigger
    to an equal share (payload rank r → trigger ⌊r·k/n⌋; the ranks here are a seeded random order),
    x' = x + α_j · mask_j ⊙ (mark_j − x). The test trigger applies the `test_patches` triggers one
    after another at test_alpha = 1 (config.py `adaptive_patch_test_trigger_alphas`). The
    authors' CIFAR-10 test trigger is two marks (phoenix_corner2 — not a training mark — and
    badnet_patch4, the third training mark); bdexp's default `test_patches: null` applies all k;
    `test_patches: [0, 2]` is the nearest to theirs. per_sample > 1 draws a uniform random subset.
- defaults poison_rate = 0.003 (both) and cover_rate = 0.003 (adap_blend) / 0.006 (adap_patch):
  the README's CIFAR-10 commands (`-poison_rate 0.003 -cover_rate 0.003` for adaptive_blend,
  `-poison_rate 0.003 -cover_rate 0.006` for adaptive_patch), the paper's CIFAR-10 setting.

No trigger image is downloaded. The authors blend hellokitty_32.png and use four logo/patch images
(phoenix_corner, firefox_corner, badnet_patch4, trojan_square); bdexp's defaults are seeded
patterns: adap_blend's b is seeded uniform noise (or `image`, a file, as `blended`); adap_patch's
marks are seeded uniform-noise squares of side `size` (4 px, our choice) at the corners (`placement:
corners`: top-left, top-right, bottom-left, bottom-right, k <= 4) or at seeded random positions, or
`images`: one file per trigger, full-frame, its non-black pixels the mask (the authors' rule when
no mask file exists). The per-sample randomness (tiles, trigger choice) is drawn once, at poisoning,
from a generator seeded by the run seed, as the authors poison once and save the set.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch

from bdexp.attacks.base import ATTACKS, Attack, AttackOptions, PoisonedTrainSet
from bdexp.attacks.blended import load_image
from bdexp.errors import ConfigError
from bdexp.options import option
from bdexp.seeding import derive_seed


@dataclass(frozen=True)
class AdaptiveOptions(AttackOptions):
    poison_rate: float = option(0.003, lo=0, hi=1)  # payload: a fraction of `budget` (README: 0.003)
    cover_rate: float = option(0.003, lo=0, hi=1)  # covers: round(cover_rate·N) of the whole training set


class AdaptiveAttack(Attack):
    """Payload + cover poisoning with a training-time trigger (`train_trigger`) weaker than the
    test-time one (`apply_trigger`); subclasses implement both."""

    def build(self, generator: torch.Generator) -> None:
        if self.opts.label_mode == "clean":
            raise ConfigError(
                f"attack.label_mode=clean is not allowed for {self.name}: its payload is relabelled and its "
                "cover samples keep their labels (Qi et al. 2023 §4), so a clean-label payload would be "
                "cover samples only; use label_mode=dirty"
            )
        self.cover_rate = self.opts.cover_rate

    def train_trigger(self, x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """The training-time trigger, per-sample randomness from `generator` (override)."""
        raise NotImplementedError

    def select_cover(self, n_rows: int, payload: torch.Tensor) -> torch.Tensor:
        """Sorted indices of round(cover_rate·N) rows, none of them a payload row."""
        n = int(round(self.cover_rate * n_rows))
        if self.cover_rate > 0 and n == 0:
            raise ConfigError(f"attack.cover_rate={self.cover_rate} rounds to 0 cover samples of {n_rows} "
                              "training rows; raise cover_rate, use more data, or set cover_rate=0")
        free = torch.ones(n_rows, dtype=torch.bool)
        free[payload.cpu()] = False
        candidates = free.nonzero().flatten()
        if n > len(candidates):
            raise ConfigError(
                f"attack.cover_rate={self.cover_rate} asks for {n} cover samples but only {len(candidates)} "
                f"rows are not payload; lower cover_rate (at most {len(candidates) / n_rows:.4f}) or poison_rate"
            )
        g = torch.Generator().manual_seed(derive_seed(self.seed, "cover"))
        return candidates[torch.randperm(len(candidates), generator=g)[:n]].sort().values

    def poison_train(self, x: torch.Tensor, y: torch.Tensor) -> PoisonedTrainSet:
        self._check_images(x, y)
        y = y.long()
        dev = y.device
        idx = self.select(y.cpu()).to(dev)
        cov = self.select_cover(len(y), idx).to(dev)
        g = torch.Generator().manual_seed(derive_seed(self.seed, f"train_trigger/{self.name}"))
        x_pay, x_cov = self.train_trigger(x[idx], g), self.train_trigger(x[cov], g)
        y_pay = self.new_labels(y[idx])
        if self.inject == "replace":
            x_out, y_out, y_true = x.clone(), y.clone(), y.clone()
            x_out[idx], y_out[idx], x_out[cov] = x_pay, y_pay, x_cov
            poison = torch.zeros(len(y), dtype=torch.bool, device=dev)
            cover = poison.clone()
            poison[idx], cover[cov] = True, True
        else:  # append: payload copies, then cover copies; the originals stay clean
            x_out = torch.cat([x, x_pay, x_cov])
            y_out = torch.cat([y, y_pay, y[cov]])
            y_true = torch.cat([y, y[idx], y[cov]])
            flags = torch.zeros(len(y_out), dtype=torch.bool, device=dev)
            poison, cover = flags.clone(), flags.clone()
            poison[len(y) : len(y) + len(idx)] = True
            cover[len(y) + len(idx) :] = True
        cross = torch.zeros_like(poison)
        return PoisonedTrainSet(x_out, y_out, y_true, poison, cross, cover=cover)


# ---------------------------------------------------------------------------- Adaptive-Blend
@dataclass(frozen=True)
class AdapBlendOptions(AdaptiveOptions):
    pieces: int = option(16, lo=1)  # tiles of the blend image, a square number (a g×g grid)
    mask_rate: float = option(0.5, lo=0, hi=1)  # share of tiles masked out per training sample
    train_alpha: float = option(0.15, lo=0, hi=1)  # opacity of the training-time (partial) trigger
    test_alpha: float = option(0.2, lo=0, hi=1)  # opacity of the test-time (whole) trigger
    image: str | None = None  # null: seeded uniform noise; or an image file


def tile_ids(h: int, w: int, g: int) -> torch.Tensor:
    """(H, W) long: the index row·g + col of the g×g tile each pixel is in (boundaries ⌊i·H/g⌋)."""
    rows = torch.arange(h) * g // h
    cols = torch.arange(w) * g // w
    return rows[:, None] * g + cols[None, :]


@ATTACKS.register("adap_blend")
class AdapBlendAttack(AdaptiveAttack):
    name = "adap_blend"
    Options = AdapBlendOptions

    def build(self, generator: torch.Generator) -> None:
        super().build(generator)
        o = self.opts
        _, h, w = self.image_shape
        g = math.isqrt(o.pieces)
        if g * g != o.pieces:
            raise ConfigError(f"attack.pieces={o.pieces} is not allowed: use a square number "
                              "(a g×g grid: 4, 9, 16, ...)")
        if g > min(h, w):
            raise ConfigError(f"attack.pieces={o.pieces} asks for a {g}×{g} grid on a {h}×{w} image; "
                              f"use at most {min(h, w) ** 2} pieces")
        masked = round(o.mask_rate * o.pieces)
        if masked >= o.pieces:
            raise ConfigError(f"attack.mask_rate={o.mask_rate} masks all {o.pieces} pieces (round(mask_rate·pieces) = "
                              f"{masked}): no trigger would be left at training time; use mask_rate < "
                              f"{(o.pieces - 0.5) / o.pieces:.4f}")
        self.pieces, self.shown = o.pieces, o.pieces - masked
        self.train_alpha, self.test_alpha = o.train_alpha, o.test_alpha
        self.tiles = tile_ids(h, w, g)
        if o.image is None:
            self.pattern = torch.rand(self.image_shape, generator=generator)
        else:
            self.pattern = load_image(o.image, self.image_shape)

    def piece_masks(self, n: int, generator: torch.Generator) -> torch.Tensor:
        """(n, H, W) float: per sample, `shown` tiles drawn uniformly at random are 1, the rest 0."""
        order = torch.rand(n, self.pieces, generator=generator).argsort(dim=1)
        on = torch.zeros(n, self.pieces).scatter_(1, order[:, : self.shown], 1.0)
        return on[:, self.tiles]

    def train_trigger(self, x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        m = self.piece_masks(len(x), generator).to(x.device, x.dtype)[:, None]
        b = self.pattern.to(x.device, x.dtype)
        return x + self.train_alpha * m * (b - x)

    def apply_trigger(self, x: torch.Tensor) -> torch.Tensor:
        b = self.pattern.to(x.device, x.dtype)
        return x + self.test_alpha * (b - x)


# ---------------------------------------------------------------------------- Adaptive-Patch
@dataclass(frozen=True)
class AdapPatchOptions(AdaptiveOptions):
    cover_rate: float = option(0.006, lo=0, hi=1)  # README's adaptive_patch command: 0.006
    train_alphas: tuple[float, ...] = option([0.5, 0.2, 0.5, 0.3], lo=0, hi=1, nonempty=True)  # one per trigger
    test_alpha: float = option(1.0, lo=0, hi=1)  # opacity of every test-time trigger
    test_patches: tuple[int, ...] | None = option(None, lo=0)  # triggers applied at test time; null: all
    per_sample: int = option(1, lo=1)  # triggers per training sample
    size: int = option(4, lo=1)  # side of each seeded square mark (our choice)
    placement: Literal["corners", "random"] = "corners"
    images: tuple[str, ...] = ()  # one full-frame image file per trigger (non-black = mask); replaces the squares


_CORNERS = ("top_left", "top_right", "bottom_left", "bottom_right")


@ATTACKS.register("adap_patch")
class AdapPatchAttack(AdaptiveAttack):
    name = "adap_patch"
    Options = AdapPatchOptions

    def build(self, generator: torch.Generator) -> None:
        super().build(generator)
        o = self.opts
        c, h, w = self.image_shape
        k = len(o.train_alphas)
        if o.per_sample > k:
            raise ConfigError(f"attack.per_sample={o.per_sample} exceeds the {k} triggers (len(train_alphas)); "
                              f"use at most {k}")
        test = tuple(range(k)) if o.test_patches is None else o.test_patches
        if not test or len(set(test)) != len(test) or max(test) >= k:
            raise ConfigError(f"attack.test_patches={list(o.test_patches or [])} is not allowed: use distinct "
                              f"trigger indices in 0..{k - 1} (len(train_alphas) = {k}), or null for all")
        marks, masks = [], []
        if o.images:
            if len(o.images) != k:
                raise ConfigError(f"attack.images has {len(o.images)} files but there are {k} triggers "
                                  "(len(train_alphas)); give one image per trigger or none")
            for path in o.images:
                img = load_image(path, self.image_shape)
                marks.append(img)
                masks.append((img > 0).any(dim=0))
        else:
            s = o.size
            if o.placement == "corners":
                if k > len(_CORNERS):
                    raise ConfigError(f"attack.placement=corners places at most 4 triggers, got {k} "
                                      "(len(train_alphas)); use placement=random or fewer triggers")
                if 2 * s > min(h, w):
                    raise ConfigError(f"attack.size={s}: four corner patches do not fit a {h}×{w} image without "
                                      f"overlapping; use size <= {min(h, w) // 2}")
            elif s > min(h, w):
                raise ConfigError(f"attack.size={s} does not fit a {h}×{w} image; use size <= {min(h, w)}")
            for j in range(k):
                if o.placement == "corners":
                    corner = _CORNERS[j]
                    top = 0 if corner.startswith("top") else h - s
                    left = 0 if corner.endswith("left") else w - s
                else:
                    top = int(torch.randint(0, h - s + 1, (1,), generator=generator))
                    left = int(torch.randint(0, w - s + 1, (1,), generator=generator))
                mark, mask = torch.zeros(c, h, w), torch.zeros(h, w, dtype=torch.bool)
                mark[:, top : top + s, left : left + s] = torch.rand(c, s, s, generator=generator)
                mask[top : top + s, left : left + s] = True
                marks.append(mark)
                masks.append(mask)
        self.k, self.per_sample, self.test_patches = k, o.per_sample, test
        self.train_alphas, self.test_alpha = o.train_alphas, o.test_alpha
        self.marks = torch.stack(marks)  # (k, C, H, W)
        self.masks = torch.stack(masks)  # (k, H, W) bool

    def choose(self, n: int, generator: torch.Generator) -> torch.Tensor:
        """(n, k) bool: the triggers each of n training samples gets. per_sample = 1: the authors'
        equal shares (rank r of a random order → trigger ⌊r·k/n⌋); more: a uniform random subset."""
        which = torch.zeros(n, self.k, dtype=torch.bool)
        if n == 0:
            return which
        if self.per_sample == 1:
            rank = torch.randperm(n, generator=generator)
            which[torch.arange(n), rank * self.k // n] = True
        else:
            order = torch.rand(n, self.k, generator=generator).argsort(dim=1)
            which.scatter_(1, order[:, : self.per_sample], True)
        return which

    def _blend(self, x: torch.Tensor, j: int, alpha: torch.Tensor | float) -> torch.Tensor:
        mark = self.marks[j].to(x.device, x.dtype)
        mask = self.masks[j].to(x.device, x.dtype)
        return x + alpha * mask * (mark - x)

    def train_trigger(self, x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        which = self.choose(len(x), generator).to(x.device)
        for j in range(self.k):
            alpha = self.train_alphas[j] * which[:, j].to(x.dtype)[:, None, None, None]
            x = self._blend(x, j, alpha)
        return x

    def apply_trigger(self, x: torch.Tensor) -> torch.Tensor:
        for j in self.test_patches:
            x = self._blend(x, j, self.test_alpha)
        return x

    def trigger_mask(self) -> torch.Tensor:
        return self.masks[list(self.test_patches)].any(dim=0)
