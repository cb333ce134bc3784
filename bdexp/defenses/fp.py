"""FP: Fine-Pruning (Liu, Dolan-Gavitt & Garg, RAID 2018, "Fine-Pruning: Defending Against
Backdooring Attacks on Deep Neural Networks").

What it computes (the paper's "pruning defense", then its "fine-pruning" defense, §4):
1. the mean activation of every channel of the last convolutional layer on the defender's clean
   data: here the s3 map, the last conv stage's activated output (bdexp/models/base.py), averaged
   over images and positions;
2. pruning in *increasing* order of that mean (channels dormant on clean inputs first: the paper's
   observation is that a backdoor lives in them), one channel at a time (`step_channels`), through
   the model's `s3_channel_mask` (a zeroed entry removes the channel everywhere downstream), until
   the clean accuracy drops past the bound: a relative drop of more than `acc_ratio` from the
   unpruned model's accuracy. The model kept is the LAST one that met the bound;
3. fine-tuning of that pruned model on the defender's clean data (the pruned channels stay pruned:
   the mask is a buffer, not a parameter).

Two faults of BackdoorBench's `defense/fp.py` are not repeated here: it prunes the suspect model in
place and keeps an *alias* of it as "the last model that met the bound", so the model it fine-tunes
is the over-pruned one (the step that broke the bound); and it measures the bound on the clean test
set. Here each candidate is a separate 0/1 mask over the channels (the search never changes the
model), the model fine-tuned is the suspect model with the last passing mask, and the bound is
measured on the defender's clean data only (`MitigationContext.x`, `.y`).

Which clean data: by default (`val_fraction: 0`) all of the defender's data serves for the ranking,
the bound and the fine-tuning. The paper uses one clean validation set for all three; the ranking
reads no labels, and the bound chooses one number (how many channels), so measuring it on the
same images costs little, while halving BackdoorBench's 5 % would cost the fine-tuning data.
`val_fraction > 0` holds out that stratified, seeded share for the bound (ranking on the rest);
the fine-tuning still uses all the data, as the choice is made by then.

Defaults: the paper leaves the pruning bound to the defender (pruning stops once the accuracy on
clean validation data falls below a threshold the defender picks); `acc_ratio` = 0.1 is
BackdoorBench's (config/defense/fp/config.yaml). The paper prunes one channel per step;
BackdoorBench steps by a fraction of the channels (`once_prune_ratio`, `step_channels` here).
Fine-tuning: BackdoorBench's config (the paper fine-tunes "on clean training data" without a
schedule): 100 epochs at the run's schedule length (`Repairer.scaled_epochs`), batch 256, SGD lr 0.01,
cosine annealing, with the run's augmentation. `epochs: 0` is the paper's pruning-only defense.

The search evaluates each candidate mask on the clean data's s3 maps, computed once (the mask acts
after stage3, so only `head` and `fc` run per step): memory is the defender data's s3 maps.
Records: `fp_pruned` (channels pruned), `fp_pruned_fraction`, `fp_clean_acc_unpruned` and
`fp_clean_acc_pruned` (on the bound's data, before fine-tuning), `fp_channels`.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from bdexp.data.loader import iterate_eval
from bdexp.defenses import DEFENSES
from bdexp.defenses.contexts import Kind
from bdexp.defenses.mitigation import MitigationContext, MitigationOptions
from bdexp.defenses.repair import Repair
from bdexp.errors import ConfigError
from bdexp.options import option
from bdexp.results import record
from bdexp.training.loop import ScheduleName

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class FPOptions(MitigationOptions):
    # BackdoorBench's acc_ratio: pruning stops once the clean accuracy falls by more than this
    # share of the unpruned model's (relative drop); the paper leaves the threshold to the defender
    acc_ratio: float = option(0.1, lo=0, hi=1)
    step_channels: int = option(1, lo=1)  # channels pruned per step (paper: one at a time)
    # share of the clean data held out for the bound (0: all of it; module docstring)
    val_fraction: float = option(0.0, lo=0, hi=1, hi_open=True)
    # fine-tuning, paper epochs (BackdoorBench's 100), scaled; 0: pruning only (the paper's pruning defense)
    epochs: float = option(100, lo=0)
    lr: float = option(0.01, lo=0, lo_open=True)  # BackdoorBench
    batch_size: int = option(256, lo=1)  # BackdoorBench
    schedule: ScheduleName = "cosine"  # BackdoorBench's CosineAnnealingLR


def holdout_rows(ctx: MitigationContext, fraction: float, tag: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(fit rows, validation rows) of the defender's data: `fraction` of each class (rounded, at
    least one image of a class with two or more) held out, seeded by the run seed and `tag`.
    `fraction` 0: both are all rows."""
    n = len(ctx.y)
    every = torch.arange(n)
    if fraction <= 0:
        return every, every
    rng = ctx.rng(tag)
    labels = ctx.y.cpu().numpy()
    held = []
    for c in np.unique(labels):
        rows = np.flatnonzero(labels == c)
        k = min(len(rows) - 1, max(1, int(round(fraction * len(rows))))) if len(rows) > 1 else 0
        held.append(rng.choice(rows, k, replace=False))
    val = np.sort(np.concatenate(held)) if held else np.zeros(0, dtype=np.int64)
    if len(val) == 0:
        raise ConfigError(f"val_fraction={fraction} of {n} clean images holds out none; "
                          "raise clean_ratio or val_fraction")
    fit = np.setdiff1d(np.arange(n), val)
    return torch.as_tensor(fit, dtype=torch.long), torch.as_tensor(val, dtype=torch.long)


def within_bound(acc: float, acc0: float, acc_ratio: float) -> bool:
    """The pruning bound: the clean accuracy fell by at most `acc_ratio` of the unpruned `acc0`."""
    return acc0 - acc <= acc_ratio * acc0 + 1e-12


@torch.no_grad()
def s3_maps(model: nn.Module, x: torch.Tensor, device: torch.device, batch_size: int) -> torch.Tensor:
    """The s3 maps (N, C, H, W) of images `x` (after the model's current mask), on `device`."""
    model.eval()
    maps = [model.feature_maps(xb)[1]["s3"].float() for xb in iterate_eval(x, batch_size, device)]
    return torch.cat(maps)


@torch.no_grad()
def accuracy_with_keep(model: nn.Module, maps: torch.Tensor, y: torch.Tensor, keep: torch.Tensor,
                       batch_size: int) -> float:
    """Clean accuracy of `model` with s3 channels `keep` (0/1 per channel) from cached s3 `maps`:
    what the model's forward gives with `s3_channel_mask` multiplied by `keep`."""
    correct = 0
    k = keep.to(maps.device, maps.dtype).view(1, -1, 1, 1)
    y = y.to(maps.device)
    for start in range(0, len(maps), batch_size):
        logits = model.fc(model.head(maps[start:start + batch_size] * k))
        correct += int((logits.argmax(1) == y[start:start + batch_size]).sum())
    return correct / max(len(maps), 1)


@dataclass(frozen=True)
class PruneSearch:
    """The pruning search's outcome: the channels in pruning order, the 0/1 keep vector of the last
    step that met the bound, and the accuracy at each step (index = channels pruned)."""

    order: torch.Tensor
    keep: torch.Tensor
    pruned: int
    acc0: float
    acc: float
    curve: list[tuple[int, float]]


@torch.no_grad()
def search(model: nn.Module, rank_maps: torch.Tensor, val_maps: torch.Tensor, y_val: torch.Tensor, acc_ratio: float,
           step: int, batch_size: int) -> PruneSearch:
    """Prune channels in increasing order of mean activation on `rank_maps` (channels the current
    mask already removed are left out), `step` at a time, until the accuracy on (`val_maps`,
    `y_val`) leaves the bound; the last passing step is returned. The model is not changed."""
    channels = rank_maps.shape[1]
    mean = rank_maps.double().mean(dim=(0, 2, 3)).cpu()
    alive = model.s3_channel_mask.detach().cpu() != 0
    order = torch.argsort(mean, stable=True)
    order = order[alive[order]]
    keep = torch.ones(channels)
    acc0 = accuracy_with_keep(model, val_maps, y_val, keep, batch_size)
    best_keep, best_n, best_acc, curve = keep.clone(), 0, acc0, [(0, acc0)]
    n = 0
    while n < len(order):
        n = min(n + step, len(order))
        trial = torch.ones(channels)
        trial[order[:n]] = 0.0  # a fresh candidate each step, never the previous one edited in place
        acc = accuracy_with_keep(model, val_maps, y_val, trial, batch_size)
        curve.append((n, acc))
        if not within_bound(acc, acc0, acc_ratio):
            break
        best_keep, best_n, best_acc = trial, n, acc
    return PruneSearch(order=order, keep=best_keep, pruned=best_n, acc0=acc0, acc=best_acc, curve=curve)


@DEFENSES.register("fp", options=FPOptions, kind=Kind.mitigation)
def fine_pruning(ctx: MitigationContext, opts: FPOptions) -> Repair:
    model = ctx.model.eval()
    if not hasattr(model, "s3_channel_mask"):
        raise ConfigError(f"fp prunes the s3 channels through `s3_channel_mask`; model {ctx.model_name!r} has none")
    fit, val = holdout_rows(ctx, opts.val_fraction, "fp/holdout")
    maps = s3_maps(model, ctx.x, ctx.device, ctx.eval_batch_size)
    rank_maps = maps if opts.val_fraction <= 0 else maps[fit.to(maps.device)]
    val_maps = maps if opts.val_fraction <= 0 else maps[val.to(maps.device)]
    found = search(model, rank_maps, val_maps, ctx.y[val], opts.acc_ratio, opts.step_channels, ctx.eval_batch_size)
    del maps, rank_maps, val_maps
    # the model handed on is the suspect model with the LAST PASSING mask, set from its own copy
    with torch.no_grad():
        mask = model.s3_channel_mask
        mask.copy_(mask * found.keep.to(mask.device, mask.dtype))
    channels = model.s3_channels
    log.info("fp: pruned %d of %d s3 channels (clean accuracy %.3f -> %.3f on %d images, bound: a relative drop of "
             "at most %g)", found.pruned, channels, found.acc0, found.acc, len(val), opts.acc_ratio)
    epochs = ctx.scaled_epochs(opts.epochs) if opts.epochs > 0 else 0
    if epochs:
        ctx.finetune(model, epochs, "fp", lr=opts.lr, batch_size=opts.batch_size, schedule=opts.schedule)
    records = [record("fp_pruned", float(found.pruned)), record("fp_pruned_fraction", found.pruned / channels),
               record("fp_channels", float(channels)), record("fp_clean_acc_unpruned", found.acc0),
               record("fp_clean_acc_pruned", found.acc)]
    return Repair(model, model_epochs=float(epochs), records=records)
