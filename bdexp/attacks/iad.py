"""`iad`: the input-aware dynamic backdoor (Nguyen & Tran, "Input-Aware Dynamic Backdoor Attack",
NeurIPS 2020), a trigger generator trained together with the classifier.

The trigger of an image is its own: x' = x + (G(x) − x) ⊙ m(x) (§3.2), with G a pattern generator
and m = threshold(M(x)) a mask generator, both encoder–decoder networks. Training (§3.3, Alg. 1):
1. The mask network M is trained alone first (round(`mask_epoch_ratio` · train.epochs) epochs, at least one:
   BackdoorBench's `clean_train_epochs` 25 for its 100 classifier epochs) with the mask-diversity loss ‖x₁ − x₂‖ / ‖m(x₁) − m(x₂)‖ (eq. 5) and the norm loss
   λ_norm · mean(relu(m − mask_density)) (§3.3: masks cover a small share of the image), then frozen.
2. With the classifier, every batch is split: a `poison_rate` share becomes backdoor samples
   (their own trigger, the target label), a `cross_ratio · poison_rate` share becomes cross-trigger
   samples (the trigger of *another* image, the true label: §3.2's "cross-trigger" mode that forces
   the trigger to be input-specific), the rest stays clean. The loss is the cross-entropy plus the
   pattern-diversity loss λ_div · ‖x₁ − x₂‖ / ‖G(x₁) − G(x₂)‖ (eq. 5); G steps with its own Adam.

Defaults: the paper's and the authors' code as BackdoorBench ships it (config/attack/inputaware):
p_attack = p_cross = 0.1, λ_div = 1, λ_norm = 100, mask density 0.032, Adam lr 0.01 with betas
(0.5, 0.9) for G and M, M's rate ×0.1 at its epochs 10 and 20 of 25, G's milestones (200+ epochs)
beyond any schedule here, so G's rate is constant. Networks: 16 base channels and 2 down-sampling
steps for 1-channel (MNIST-like) data, 32 and 3 otherwise, as in that code.

The "other image" of a cross sample is the batch's next row (the batch rolled by one); the
authors draw it from a second shuffled loader. bdexp has one loader: the pairing is as random
(rows come shuffled) and costs no second pass over the data.

Per batch, floor(poison_rate · batch) rows are poisoned (the authors' `int(pratio * bs)`); a
rate that gives none is refused. The materialized training set (bdexp/attacks/cotrained.py)
relabels round(poison_rate · N) rows by `select` and gives round(cross_ratio · n_poison) other rows
a partner's trigger (`cross`), from the final networks, seeded.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
from torch import nn

from bdexp.attacks.base import ATTACKS, AttackOptions, Mode, PoisonedTrainSet
from bdexp.attacks.cotrained import CoTrainedAttack
from bdexp.data.loader import Batch
from bdexp.errors import ConfigError
from bdexp.options import option
from bdexp.progress import make_progress
from bdexp.seeding import derive_seed

log = logging.getLogger(__name__)
_EPS = 1e-7  # the authors' EPSILON, in the tanh rescaling and the diversity ratios


@dataclass(frozen=True)
class IADOptions(AttackOptions):
    mode: Mode = "all_to_one"  # the paper's all-to-one and all-to-all (§4) are both supported
    cross_ratio: float = option(1.0, lo=0)  # p_cross / p_attack (paper: 0.1 / 0.1)
    lambda_div: float = option(1.0, lo=0)  # eq. 5's weight
    lambda_norm: float = option(100.0, lo=0)  # mask norm loss weight (authors' code)
    mask_density: float = option(0.032, lo=0, hi=1)  # target share of mask pixels (authors' code)
    # M alone before the classifier, per classifier epoch: BackdoorBench trains it 25 epochs for a
    # 100-epoch classifier (clean_train_epochs 25, epochs 100); round(ratio × train.epochs) epochs
    mask_epoch_ratio: float = option(0.25, lo=0)
    mask_milestones: tuple[float, ...] = option([0.4, 0.8], lo=0, hi=1)  # M's lr ×gamma at 10, 20 of 25 epochs
    mask_gamma: float = option(0.1, lo=0, lo_open=True)
    lr_generator: float = option(0.01, lo=0, lo_open=True)  # Adam, betas (0.5, 0.9)
    lr_mask: float = option(0.01, lo=0, lo_open=True)
    channels: int | None = option(None, lo=1)  # null: 16 for 1-channel data, else 32 (authors' code)
    steps: int | None = option(None, lo=1)  # down-sampling steps; null: 2 for 1-channel data, else 3


class _Block(nn.Sequential):
    """3×3 convolution, batch norm (momentum 0.05, as the authors'), optional ReLU."""

    def __init__(self, c_in: int, c_out: int, relu: bool = True):
        layers = [nn.Conv2d(c_in, c_out, 3, padding=1), nn.BatchNorm2d(c_out, momentum=0.05)]
        super().__init__(*layers, *([nn.ReLU(inplace=True)] if relu else []))


class EncoderDecoder(nn.Module):
    """The authors' generator shape: `steps` × (two blocks, 2×2 max-pool) doubling the channels
    from `channels`, a middle block, `steps` × (bilinear ×2, two blocks) back down to `c_out`;
    output tanh(·)/(2 + ε) + 0.5, in (0, 1)."""

    def __init__(self, c_in: int, c_out: int, channels: int, steps: int):
        super().__init__()
        layers: list[nn.Module] = []
        cur, nxt = c_in, channels
        for step in range(steps):
            layers += [_Block(cur, nxt), _Block(nxt, nxt), nn.MaxPool2d(2)]
            if step < steps - 1:
                cur, nxt = nxt, nxt * 2
        layers.append(_Block(nxt, nxt))
        cur = nxt
        for step in range(steps):
            out = c_out if step == steps - 1 else cur // 2
            layers += [nn.Upsample(scale_factor=2, mode="bilinear"), _Block(cur, cur),
                       _Block(cur, out, relu=step < steps - 1)]
            cur = out
        self.net = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.tanh(self.net(x)) / (2 + _EPS) + 0.5


def threshold(m: torch.Tensor) -> torch.Tensor:
    """The authors' soft threshold of the mask network's output: near 0 or 1 away from 0.5."""
    return torch.tanh(m * 20 - 10) / (2 + _EPS) + 0.5


def diversity(x1: torch.Tensor, x2: torch.Tensor, g1: torch.Tensor, g2: torch.Tensor) -> torch.Tensor:
    """Eq. 5: mean over pairs of ‖x₁ − x₂‖ / ‖g(x₁) − g(x₂)‖ (root-mean-square distances)."""
    d_x = (x1 - x2).pow(2).mean(dim=(1, 2, 3)).sqrt()
    d_g = (g1 - g2).pow(2).mean(dim=(1, 2, 3)).sqrt()
    return (d_x / (d_g + _EPS)).mean()


@ATTACKS.register("iad")
class InputAwareAttack(CoTrainedAttack):
    name = "iad"
    Options = IADOptions

    def build(self, generator: torch.Generator) -> None:
        c, h, w = self.image_shape
        o = self.opts
        if self.label_mode != "dirty" or self.inject != "replace" or self.budget != "dataset":
            raise ConfigError("attack=iad poisons a share of every batch (dirty label, in place): use "
                              "attack.label_mode=dirty attack.inject=replace attack.budget=dataset")
        if self.mode == "one_to_one":
            raise ConfigError("attack=iad supports mode=all_to_one or all_to_all (Nguyen & Tran §4)")
        channels = o.channels if o.channels is not None else (16 if c == 1 else 32)
        steps = o.steps if o.steps is not None else (2 if c == 1 else 3)
        if h % 2 ** steps or w % 2 ** steps:
            raise ConfigError(f"attack.steps={steps}: a {h}×{w} image must divide by 2^{steps} for the "
                              f"generators; set attack.steps to at most {_max_steps(h, w)}")
        # The networks' initial weights come from the attack's own seeded stream, not the run's
        # global RNG, so the classifier's initialization is the same with or without this attack.
        state = torch.random.get_rng_state()
        torch.manual_seed(int(torch.randint(2**62, (1,), generator=generator)))
        try:
            self.nets = nn.ModuleDict({"pattern": EncoderDecoder(c, c, channels, steps),
                                       "mask": EncoderDecoder(c, 1, channels, steps)})
        finally:
            torch.random.set_rng_state(state)
        self.nets.eval()
        self.mask_epochs = 0  # set by start_training from the classifier's epochs
        self.mask_done = False
        self.opt_pattern: torch.optim.Adam | None = None
        self.opt_mask: torch.optim.Adam | None = None

    # ---------------------------------------------------------------- the trigger
    def _mask(self, x: torch.Tensor) -> torch.Tensor:
        return threshold(self.nets["mask"](x))

    def _stamp(self, x: torch.Tensor, source: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x with the trigger generated from `source` (itself for a backdoor sample), and the pattern."""
        pattern = self.nets["pattern"](source)
        return x + (pattern - x) * self._mask(source), pattern

    def apply_trigger(self, x: torch.Tensor) -> torch.Tensor:
        dev = next(self.nets.parameters()).device
        return self._stamp(x.to(dev), x.to(dev))[0].clamp(0, 1).to(x.device)

    def materialize(self, x: torch.Tensor, y: torch.Tensor) -> PoisonedTrainSet:
        out = super().materialize(x, y)
        cross = out.cross.nonzero().flatten()
        if len(cross):
            g = torch.Generator().manual_seed(derive_seed(self.seed, "iad/cross_partner"))
            # each cross row takes the trigger of another row: a random shift of the row order
            partner = (cross + 1 + torch.randint(len(y) - 1, (len(cross),), generator=g)) % len(y)
            with torch.no_grad():
                stamped = torch.cat([self._stamp(a, b)[0] for a, b in zip(x[cross].split(1024), x[partner].split(1024))])
            out.x[cross] = stamped.clamp(0, 1)
        return out

    def select_cross(self, poison: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        n = int(round(self.opts.cross_ratio * int(poison.sum())))
        return self.draw_unpoisoned(poison, n, generator, f"attack.cross_ratio={self.opts.cross_ratio} (cross-trigger rows)")

    # ---------------------------------------------------------------- training
    def start_training(self, device: torch.device, total_epochs: int) -> None:
        ratio = self.opts.mask_epoch_ratio
        self.mask_epochs = max(1, round(ratio * total_epochs)) if ratio > 0 else 0  # a short run still trains M
        self.mask_done = self.mask_epochs == 0
        self.nets.to(device)
        self.opt_pattern = torch.optim.Adam(self.nets["pattern"].parameters(), self.opts.lr_generator, betas=(0.5, 0.9))
        self.opt_mask = torch.optim.Adam(self.nets["mask"].parameters(), self.opts.lr_mask, betas=(0.5, 0.9))
        self._trained = False

    @property
    def pretrained(self) -> bool:
        return self.mask_done

    def pretrain(self, loader, device: torch.device) -> None:
        """Step 1 of the module docstring: M alone, `mask_epochs` epochs, then frozen."""
        o, epochs = self.opts, self.mask_epochs
        net, opt = self.nets["mask"], self.opt_mask
        assert opt is not None
        milestones = sorted({max(1, round(f * epochs)) for f in o.mask_milestones})
        net.train()
        with make_progress() as progress:
            task = progress.add_task("iad: mask network", total=epochs * len(loader), info="")
            for epoch in range(epochs):
                for group in opt.param_groups:
                    group["lr"] = o.lr_mask * o.mask_gamma ** sum(epoch >= m for m in milestones)
                for batch in loader:
                    x1, x2 = batch.x, batch.x.roll(1, 0)
                    m1, m2 = threshold(net(x1)), threshold(net(x2))
                    loss = o.lambda_norm * torch.relu(m1 - o.mask_density).mean() + o.lambda_div * diversity(x1, x2, m1, m2)
                    opt.zero_grad(set_to_none=True)
                    loss.backward()
                    opt.step()
                    progress.update(task, advance=1, info=f"ep {epoch + 1}/{epochs} loss {loss.item():.3f} "
                                                          f"density {m1.mean().item():.3f}")
        net.eval()
        self.mask_done = True

    def begin_epoch(self, epoch: int) -> None:
        self.nets["pattern"].train()
        self.nets["mask"].eval().requires_grad_(False)

    def poison_batch(self, model: nn.Module, batch: Batch) -> tuple[Batch, torch.Tensor | None]:
        o = self.opts
        x, y = batch.x, batch.y
        n_bd = int(self.poison_rate * len(y))
        n_cross = min(int(o.cross_ratio * self.poison_rate * len(y)), len(y) - n_bd)
        if n_bd == 0:
            raise ConfigError(f"attack.poison_rate={self.poison_rate} poisons no row of a {len(y)}-image batch "
                              f"(iad poisons floor(rate·batch) per batch); raise poison_rate or train.batch_size")
        partner = x.roll(1, 0)
        x_bd, pattern1 = self._stamp(x[:n_bd], x[:n_bd])
        x_cross, pattern2 = self._stamp(x[n_bd:n_bd + n_cross], partner[n_bd:n_bd + n_cross])
        pairs = min(n_bd, n_cross)
        extra = None
        if pairs and o.lambda_div > 0:
            # eq. 5 over (x₁ = a backdoor row, x₂ = the cross rows' partner): the authors' pairing
            extra = o.lambda_div * diversity(x[:pairs], partner[n_bd:n_bd + pairs], pattern1[:pairs], pattern2[:pairs])
        poison = torch.zeros_like(batch.poison)
        poison[:n_bd] = True
        cross = torch.zeros_like(batch.cross)
        cross[n_bd:n_bd + n_cross] = True
        out = Batch(x=torch.cat([x_bd, x_cross, x[n_bd + n_cross:]]),
                    y=torch.cat([self.new_labels(y[:n_bd]), y[n_bd:]]),
                    poison=poison, cross=cross, index=batch.index)
        return out, extra

    def end_training(self) -> None:
        super().end_training()
        self.opt_pattern = self.opt_mask = None  # rebuilt by start_training; not carried with the run

    def zero_grad(self) -> None:
        assert self.opt_pattern is not None
        self.opt_pattern.zero_grad(set_to_none=True)

    def step(self) -> None:
        assert self.opt_pattern is not None
        self.opt_pattern.step()

    def training_state(self) -> dict:
        assert self.opt_pattern is not None and self.opt_mask is not None
        return {"nets": self.nets.state_dict(), "opt_pattern": self.opt_pattern.state_dict(),
                "opt_mask": self.opt_mask.state_dict(), "mask_done": self.mask_done}

    def load_training_state(self, state: dict) -> None:
        assert self.opt_pattern is not None and self.opt_mask is not None
        self.nets.load_state_dict(state["nets"])
        self.opt_pattern.load_state_dict(state["opt_pattern"])
        self.opt_mask.load_state_dict(state["opt_mask"])
        self.mask_done = bool(state["mask_done"])


def _max_steps(h: int, w: int) -> int:
    steps = 0
    while h % 2 ** (steps + 1) == 0 and w % 2 ** (steps + 1) == 0:
        steps += 1
    return steps
