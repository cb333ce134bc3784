"""ANP: Adversarial Neuron Pruning (Wu & Wang, NeurIPS 2021, "Adversarial Neuron Pruning Purifies
Backdoored Deep Models").

A neuron is a channel of a BatchNorm2d layer (its weight w_k and bias b_k). ANP learns a mask
m_k in [0, 1] per neuron on the defender's clean data, against adversarial neuron perturbations
(the paper's §3, "adversarial neuron perturbation" and "adversarial neuron pruning", Alg. 1):
the perturbed neuron has weight (m_k + δ_k) w_k and bias (1 + ξ_k) b_k with |δ_k|, |ξ_k| <= ε,
and the masks minimise

    α · L(m ⊙ w, b)  +  (1 − α) · max_{δ, ξ} L((m + δ) ⊙ w, (1 + ξ) ⊙ b)        (the ANP objective)

where L is the cross-entropy on clean batches. The inner max: δ, ξ drawn uniformly in [−ε, ε],
then `anp_steps` signed-gradient ascent steps of size ε / anp_steps, kept within [−ε, ε]; the outer
min: one SGD step on the masks (momentum 0.9), clipped to [0, 1]. Backdoor neurons are the ones
whose perturbation most easily flips clean predictions (to the target), so their masks fall.
Neurons whose mask is at most the threshold are then pruned: the mask is 0, i.e. the BN weight is
zeroed and the bias kept (the paper masks the weights only; `prune_bias: true` zeroes the bias as well).

The perturbation is implemented by swapping each affine BatchNorm2d of the copy of the suspect
model for a wrapper that holds the original module and the mask/noise parameters; the modules
are swapped back afterwards, so the returned model has exactly the architecture's state dict (the
evaluator loads it strictly), with pruned neurons realised by zeroed BN weights. The model's own
weights and BN statistics are not changed by the mask learning: with `bn_stats: batch` (the
reference code trains masks in train mode) the wrapper normalises with the batch's statistics
without updating the running ones.

Choosing what to prune (never with test data; BackdoorBench picks the pruning that minimises the
*test* ASR within a test-accuracy bound, which needs the attack's test set):
- `prune_by: threshold` (default): prune every neuron with mask <= `threshold` = 0.2 (the paper's
  setting, experimental settings of §4). No data chooses anything.
- `prune_by: bound`: the largest threshold of the curve grid before the clean accuracy on the
  defender's data first falls by more than `acc_ratio` (relative, BackdoorBench's 0.1) of the
  unpruned model's.
The whole curve (thresholds 0, `curve_step`, ..., `curve_max`: BackdoorBench's pruning_step 0.05
and pruning_max 0.9) is recorded as `anp_curve_clean_acc` and `anp_curve_pruned`, tagged
`threshold` and `curve_data`: "held_out" when `val_fraction > 0` held out that stratified share
of the clean data from the mask learning, else "mask_data" (the masks' own data, an optimistic
curve: the masks were fit to keep those images right). With `val_fraction: 0` the bound mode
therefore chooses on data the masks were fit on; hold some out for it.

Defaults: the paper (§4, experimental settings) and the authors' code: ε = 0.4, α = 0.2, anp_steps 1, mask lr 0.2 with
momentum 0.9, batch 128, 2000 iterations, threshold 0.2; BackdoorBench's config/defense/anp
agrees except batch_size 256. Iterations are scaled like epochs (paper iterations × train.epochs /
sanitizer_reference_epochs: 400 under scale=cpu). Batches are epochs over the defender's data
with the run's augmentation (the reference samples batches with replacement, with its train
transforms). One departure: the reference codes leave δ, ξ unclipped after the ascent step (up to
2ε after one step from a uniform start); the paper bounds them by ε, so they are clipped here
(`clip_noise: false` gives the reference's behaviour).

Cost (`model_epochs`): the images of every batch, counted (anp_steps + 2) times (the ascent steps,
the perturbed and the natural loss; once with eps 0), over the defender data's size; the
forward-only curve is not counted.
"""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from bdexp.defenses import DEFENSES
from bdexp.defenses.contexts import Kind
from bdexp.defenses.fp import holdout_rows, within_bound
from bdexp.defenses.mitigation import MitigationContext, MitigationOptions
from bdexp.defenses.repair import Repair
from bdexp.errors import ConfigError
from bdexp.options import option
from bdexp.results import record
from bdexp.seeding import derive_seed

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ANPOptions(MitigationOptions):
    eps: float = option(0.4, lo=0)  # paper §4 settings / BackdoorBench anp_eps: perturbation budget of δ, ξ
    alpha: float = option(0.2, lo=0, hi=1)  # paper §4 settings / BackdoorBench anp_alpha: weight of the natural loss
    anp_steps: int = option(1, lo=1)  # paper / BackdoorBench: ascent steps of the inner max
    iterations: int = option(2000, lo=1)  # paper / BackdoorBench nb_iter, scaled like epochs
    mask_lr: float = option(0.2, lo=0, lo_open=True)  # paper / BackdoorBench lr (SGD, momentum 0.9)
    batch_size: int = option(128, lo=1)  # paper and the authors' code (BackdoorBench: 256)
    clip_noise: bool = True  # keep δ, ξ in [-eps, eps] after each ascent (the paper's budget; reference codes: no)
    bn_stats: Literal["batch", "running"] = "batch"  # BN statistics while learning masks (reference: train mode, batch)
    prune_by: Literal["threshold", "bound"] = "threshold"  # module docstring
    threshold: float = option(0.2, lo=0, hi=1)  # paper §4 settings: prune neurons with mask <= 0.2
    acc_ratio: float = option(0.1, lo=0, hi=1)  # prune_by=bound: BackdoorBench's relative clean-accuracy tolerance
    curve_step: float = option(0.05, lo=0, lo_open=True)  # BackdoorBench pruning_step
    curve_max: float = option(0.9, lo=0, hi=1)  # BackdoorBench pruning_max
    # share of the clean data held out from the mask learning for the curve and the bound (0: none)
    val_fraction: float = option(0.0, lo=0, hi=1, hi_open=True)
    prune_bias: bool = False  # also zero the pruned neurons' BN bias (the paper masks the weight only)


class PerturbedBN(nn.Module):
    """An affine BatchNorm2d as ANP's neurons: weight × (mask + δ), bias × (1 + ξ) when perturbed,
    weight × mask otherwise. Holds the original module (its parameters are not trained here)."""

    def __init__(self, bn: nn.BatchNorm2d, batch_stats: bool):
        super().__init__()
        self.bn = bn
        like = dict(device=bn.weight.device, dtype=bn.weight.dtype)
        self.mask = nn.Parameter(torch.ones(bn.num_features, **like))
        self.noise_w = nn.Parameter(torch.zeros(bn.num_features, **like))
        self.noise_b = nn.Parameter(torch.zeros(bn.num_features, **like))
        self.perturbed = False
        self.batch_stats = bool(batch_stats) or bn.running_mean is None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bn = self.bn
        if self.perturbed:
            w, b = bn.weight * (self.mask + self.noise_w), bn.bias * (1.0 + self.noise_b)
        else:
            w, b = bn.weight * self.mask, bn.bias
        if self.batch_stats:  # the batch's statistics; the running ones are neither used nor updated
            return F.batch_norm(x, None, None, w, b, True, 0.0, bn.eps)
        return F.batch_norm(x, bn.running_mean, bn.running_var, w, b, False, 0.0, bn.eps)


def wrap_batchnorms(model: nn.Module, batch_stats: bool) -> dict[str, PerturbedBN]:
    """Swap every affine BatchNorm2d of `model` for a `PerturbedBN` (in place); {name: wrapper}."""
    found = [(name, m) for name, m in model.named_modules() if isinstance(m, nn.BatchNorm2d) and m.affine]
    wrappers = {}
    for name, bn in found:
        parent_name, _, attr = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        wrappers[name] = PerturbedBN(bn, batch_stats)
        setattr(parent, attr, wrappers[name])
    return wrappers


def unwrap_batchnorms(model: nn.Module, wrappers: dict[str, PerturbedBN]) -> None:
    """Put the original BatchNorm2d modules back where `wrap_batchnorms` took them."""
    for name, wrapper in wrappers.items():
        parent_name, _, attr = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, attr, wrapper.bn)


class _GeneratorState:
    """A torch.Generator as `Repairer.epochs` state (state_dict / load_state_dict)."""

    def __init__(self, generator: torch.Generator):
        self.generator = generator

    def state_dict(self) -> dict:
        return {"state": self.generator.get_state()}

    def load_state_dict(self, state: dict) -> None:
        self.generator.set_state(state["state"])


def _set_perturbed(wrappers, on: bool) -> None:
    for w in wrappers:
        w.perturbed = on


def learn_masks(ctx: MitigationContext, model: nn.Module, wrappers: dict[str, PerturbedBN], opts: ANPOptions,
                rows: torch.Tensor, iterations: int) -> float:
    """Alg. 1: `iterations` mask updates on the defender's rows `rows` (resumable: the masks, the
    optimiser, the loader's and the noise's generators are saved every pass over the data); returns
    the images passed, counted once per forward-backward pass. The masks stay in the wrappers."""
    mods = list(wrappers.values())
    masks = [w.mask for w in mods]
    noises = [p for w in mods for p in (w.noise_w, w.noise_b)]
    mask_opt = torch.optim.SGD(masks, lr=opts.mask_lr, momentum=0.9)
    loader = ctx.loader("anp/masks", opts.batch_size, rows=rows)
    gen = torch.Generator(device="cpu").manual_seed(derive_seed(ctx.seed, "anp/noise"))
    per_round = max(1, len(loader))
    rounds = math.ceil(iterations / per_round)
    step = opts.eps / opts.anp_steps
    holder = nn.ModuleList(mods)
    for r in ctx.epochs("anp/masks", rounds, holder, mask_opt, loader, _GeneratorState(gen)):
        for i, batch in enumerate(loader):
            if r * per_round + i >= iterations:
                break
            x, y = batch.x, batch.y
            if opts.eps > 0:  # the inner max: a random start in [-eps, eps], then signed ascent
                with torch.no_grad():
                    for p in noises:
                        p.copy_(torch.rand(p.shape, generator=gen).mul_(2 * opts.eps).sub_(opts.eps).to(p))
                _set_perturbed(mods, True)
                for _ in range(opts.anp_steps):
                    for p in noises:
                        p.grad = None
                    F.cross_entropy(model(x), y).backward()
                    with torch.no_grad():
                        for p in noises:
                            p.add_(step * p.grad.sign())
                            if opts.clip_noise:
                                p.clamp_(-opts.eps, opts.eps)
            mask_opt.zero_grad(set_to_none=True)
            loss_rob = 0.0
            if opts.eps > 0:
                _set_perturbed(mods, True)
                loss_rob = F.cross_entropy(model(x), y)
            _set_perturbed(mods, False)
            loss_nat = F.cross_entropy(model(x), y)
            (opts.alpha * loss_nat + (1 - opts.alpha) * loss_rob).backward()
            mask_opt.step()
            with torch.no_grad():
                for m in masks:
                    m.clamp_(0.0, 1.0)
    _set_perturbed(mods, False)
    # the cost, from the batch sizes (a resumed run counts the passes it did not redo too)
    n, bs = len(rows), loader.batch_size
    sizes = [min(bs, n - i * bs) for i in range(per_round)]
    images = sum(sizes) * (iterations // per_round) + sum(sizes[:iterations % per_round])
    return float(images * ((opts.anp_steps + 1 if opts.eps > 0 else 0) + 1))


def thresholds(step: float, top: float) -> list[float]:
    """The curve's grid 0, step, 2·step, ... <= top (rounded, so 0.2 is 0.2)."""
    n = int(math.floor(top / step + 1e-9))
    return [round(i * step, 10) for i in range(n + 1)]


@torch.no_grad()
def prune(bns: dict[str, nn.BatchNorm2d], masks: dict[str, torch.Tensor], threshold: float, prune_bias: bool,
          original: dict[str, tuple[torch.Tensor, torch.Tensor]]) -> int:
    """Set each BN to its `original` (weight, bias) with the neurons of mask <= `threshold` zeroed
    (the bias too when `prune_bias`); returns how many were pruned."""
    count = 0
    for name, bn in bns.items():
        weight, bias = original[name]
        cut = masks[name].to(weight.device) <= threshold
        bn.weight.copy_(torch.where(cut, torch.zeros_like(weight), weight))
        bn.bias.copy_(torch.where(cut, torch.zeros_like(bias), bias) if prune_bias else bias)
        count += int(cut.sum())
    return count


@torch.no_grad()
def threshold_curve(ctx: MitigationContext, model: nn.Module, bns: dict[str, nn.BatchNorm2d],
                    masks: dict[str, torch.Tensor], x: torch.Tensor, y: torch.Tensor,
                    opts: ANPOptions) -> tuple[float, list[tuple[float, float, int]]]:
    """(the unpruned accuracy, [(threshold, accuracy, neurons pruned)]) of `model` on the clean
    images `x`, `y` pruned at each threshold of the grid; the BN layers are left as they were."""
    original = {name: (bn.weight.detach().clone(), bn.bias.detach().clone()) for name, bn in bns.items()}
    try:
        acc0 = ctx.accuracy(model, x, y)
        curve = []
        for t in thresholds(opts.curve_step, opts.curve_max):
            n = prune(bns, masks, t, opts.prune_bias, original)
            curve.append((t, ctx.accuracy(model, x, y), n))
    finally:
        prune(bns, masks, -1.0, False, original)  # nothing is <= -1: the original weights and biases
    return acc0, curve


def choose_threshold(curve: list[tuple[float, float]], acc0: float, acc_ratio: float) -> float:
    """`prune_by: bound`: the last threshold of `curve` ((threshold, clean accuracy), increasing)
    before the first whose accuracy leaves the bound (0 when the first already does)."""
    chosen = 0.0
    for t, acc in curve:
        if not within_bound(acc, acc0, acc_ratio):
            break
        chosen = t
    return chosen


@DEFENSES.register("anp", options=ANPOptions, kind=Kind.mitigation)
def adversarial_neuron_pruning(ctx: MitigationContext, opts: ANPOptions) -> Repair:
    model = ctx.model.eval()
    fit, val = holdout_rows(ctx, opts.val_fraction, "anp/holdout")
    if opts.prune_by == "bound" and opts.val_fraction <= 0:
        log.warning("anp: prune_by=bound with val_fraction=0 measures the bound on the images the masks were fit on "
                    "(an optimistic curve); hold some out with defense.anp.val_fraction")
    wrappers = wrap_batchnorms(model, opts.bn_stats == "batch")
    if not wrappers:
        raise ConfigError(f"anp perturbs BatchNorm2d neurons; model {ctx.model_name!r} has no affine BatchNorm2d")
    grads = {name: p.requires_grad for name, p in model.named_parameters()}
    try:
        for w in wrappers.values():
            w.bn.requires_grad_(False)
        for p in model.parameters():
            p.requires_grad_(False)
        for w in wrappers.values():
            for p in (w.mask, w.noise_w, w.noise_b):
                p.requires_grad_(True)
        iterations = ctx.scaled_epochs(opts.iterations)
        seen = learn_masks(ctx, model, wrappers, opts, fit, iterations)
    finally:
        unwrap_batchnorms(model, wrappers)
        for name, p in model.named_parameters():
            p.requires_grad_(grads.get(name, True))
    model.eval()
    masks = {name: w.mask.detach().clone() for name, w in wrappers.items()}
    bns = {name: w.bn for name, w in wrappers.items()}
    original = {name: (bn.weight.detach().clone(), bn.bias.detach().clone()) for name, bn in bns.items()}
    neurons = sum(len(m) for m in masks.values())

    x_val, y_val = ctx.x[val], ctx.y[val]
    curve_data = "held_out" if opts.val_fraction > 0 else "mask_data"
    acc0, curve = threshold_curve(ctx, model, bns, masks, x_val, y_val, opts)
    records = [rec for t, acc, n in curve
               for rec in (record("anp_curve_clean_acc", acc, threshold=t, curve_data=curve_data),
                           record("anp_curve_pruned", float(n), threshold=t, curve_data=curve_data))]
    curve = [(t, acc) for t, acc, _ in curve]
    chosen = opts.threshold if opts.prune_by == "threshold" else choose_threshold(curve, acc0, opts.acc_ratio)
    pruned = prune(bns, masks, chosen, opts.prune_bias, original)
    acc = ctx.accuracy(model, x_val, y_val)
    all_masks = torch.cat([m.cpu() for m in masks.values()])
    log.info("anp: pruned %d of %d BN neurons at threshold %g (%s; clean accuracy %.3f -> %.3f on %d images)",
             pruned, neurons, chosen, opts.prune_by, acc0, acc, len(y_val))
    records += [record("anp_threshold", chosen), record("anp_pruned", float(pruned)),
                record("anp_pruned_fraction", pruned / neurons), record("anp_neurons", float(neurons)),
                record("anp_clean_acc_unpruned", acc0, curve_data=curve_data),
                record("anp_clean_acc_pruned", acc, curve_data=curve_data),
                record("anp_mask_min", float(all_masks.min())), record("anp_mask_mean", float(all_masks.mean())),
                record("anp_iterations", float(iterations))]
    return Repair(model, model_epochs=seen / max(len(ctx.y), 1), records=records)
