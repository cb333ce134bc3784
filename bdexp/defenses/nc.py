"""Neural Cleanse (Wang et al., S&P 2019) as run in ML-MMDR §6.2 / Figs. 8-10: an inspector.

1. Trigger synthesis: for every class c optimise a mask m (H×W) and a pattern p (C×H×W) on the
   defender's clean reserve so that x' = (1−m)⊙x + m⊙p is classified as c, minimising
   CE(f(x'), c) + λ‖m‖₁ with Adam; λ is adapted to keep the attack on the batch ≥ 99 %.
   All classes of a group are optimised in ONE forward pass (K stacked copies of the batch,
   one mask/pattern per class); the K losses are summed, and since every class has its own
   parameters (and Adam is element-wise) this is exactly K independent optimisations.
2. Outlier test: MAD anomaly index of the per-class mask ℓ1 norms; a class below the median
   with index > 2 is flagged as infected (ML-MMDR Fig. 8: infected vs uninfected ℓ1).
3. Neuron pruning with the REAL trigger (ML-MMDR §6.2, Fig. 10): see `bdexp.defenses.pruning`.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from bdexp.data.loader import to_float
from bdexp.defenses import DEFENSES
from bdexp.defenses.contexts import Kind, InspectorContext, InspectorOutput
from bdexp.options import Options, option
from bdexp.defenses.pruning import pruning_curve
from bdexp.errors import ConfigError
from bdexp.progress import make_progress
from bdexp.results import record

log = logging.getLogger(__name__)

MAD_CONSISTENCY = 1.4826  # MAD -> std of a normal distribution (NC §IV-C, "consistency constant")


@dataclass
class ReversedTriggers:
    """Per-class result of the synthesis (CPU tensors, classes in the order given)."""

    classes: list[int]
    mask: torch.Tensor  # (K, H, W) in [0, 1]
    pattern: torch.Tensor  # (K, C, H, W) in [0, 1]
    l1: torch.Tensor  # (K,) ‖mask‖₁ of the recorded mask
    success: torch.Tensor  # (K,) batch attack success when that mask was recorded
    reached: torch.Tensor  # (K,) bool: the threshold was reached (else the last mask is kept)


def anomaly_index(l1: Sequence[float] | np.ndarray, threshold: float,
                  consistency: float = MAD_CONSISTENCY) -> tuple[np.ndarray, np.ndarray]:
    """NC's MAD outlier test (NC §IV-C). Returns (index, flagged) per class.

    index = |ℓ1 − median| / (consistency · MAD), MAD = median |ℓ1 − median|; a class is flagged
    only when its ℓ1 lies BELOW the median (a small trigger) and index > `threshold`. The index
    itself is reported for every class (as NC's code does). With MAD = 0 (all but outliers
    equal) any deviation gets an index of 1e12 (effectively infinite) and identical values 0.
    """
    v = np.asarray(l1, dtype=np.float64)
    median = np.median(v)
    dev = np.abs(v - median)
    mad = consistency * np.median(dev)
    index = dev / mad if mad > 0 else np.where(dev > 0, 1e12, 0.0)
    flagged = (v < median) & (index > threshold)
    return index, flagged


@dataclass(frozen=True)
class NCOptions(Options):
    """conf/defense/nc.yaml explains each value (NC's code for the synthesis settings)."""

    steps: int = option(300, lo=1)
    batch_size: int = option(64, lo=1)
    lr: float = option(0.1, lo=0, lo_open=True)
    betas: tuple[float, float] = option([0.5, 0.9], lo=0, hi=1, hi_open=True)
    init_cost: float = option(1.0e-3, lo=0)
    cost_multiplier: float = option(1.5, lo=1)
    patience: int = option(5, lo=1)
    attack_threshold: float = option(0.99, lo=0, hi=1)
    classes_per_step: int | None = option(10, lo=1)  # classes per forward pass; null = all
    num_images: int | None = option(None, lo=1)  # reserve images used; null = all
    anomaly_threshold: float = option(2.0, lo=0)
    figure: bool = True
    prune: bool = True
    prune_images: int | None = option(500, lo=1)
    prune_ratios: tuple[float, ...] = option([0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9], lo=0, hi=1)
    eval_images: int | None = option(2000, lo=1)


def synthesize_triggers(model: nn.Module, x: torch.Tensor, classes: Sequence[int], device: torch.device,
                        opts: NCOptions, *, seed: int, describe: str = "nc") -> ReversedTriggers:
    """Reverse-engineer one trigger (mask, pattern) per class in `classes` from clean images `x`
    (uint8 or float [0, 1], NCHW). Groups of `opts.classes_per_step` classes (None = all) share
    one forward pass."""
    if len(x) == 0:
        raise ConfigError("nc: needs clean images, has none; raise screening.reserve_per_class")
    steps, classes_per_step = opts.steps, opts.classes_per_step
    x = (to_float(x) if x.dtype == torch.uint8 else x.float()).to(device)
    classes = [int(c) for c in classes]
    group = max(1, int(classes_per_step or len(classes)))
    groups = [classes[i:i + group] for i in range(0, len(classes), group)]
    gen = torch.Generator().manual_seed(int(seed))
    was_training = model.training
    model.eval()
    parts = []
    try:
        with make_progress() as progress:
            task = progress.add_task(describe, total=steps * len(groups), info="")
            for g in groups:
                parts.append(_optimise_group(model, x, g, device, gen, progress, task, opts))
    finally:
        model.train(was_training)
    return ReversedTriggers(classes, *(torch.cat([p[i] for p in parts]) for i in range(5)))


def _optimise_group(model: nn.Module, x: torch.Tensor, group: list[int], device: torch.device,
                    gen: torch.Generator, progress, task, opts: NCOptions) -> tuple[torch.Tensor, ...]:
    """NC's optimisation for the classes of one group at once; one λ schedule per class."""
    steps, batch_size, lr, betas = opts.steps, opts.batch_size, opts.lr, opts.betas
    init_cost, cost_multiplier, patience = opts.init_cost, opts.cost_multiplier, opts.patience
    attack_threshold = opts.attack_threshold
    n, (c, h, w), k = len(x), x.shape[1:], len(group)
    # NC code: mask and pattern start uniform-random in [0, 1] and live in an unbounded space
    # (tanh there, sigmoid here: the same reparametrisation up to scale).
    mask_p = torch.logit(torch.rand(k, 1, h, w, generator=gen).clamp(0.01, 0.99)).to(device).requires_grad_()
    pattern_p = torch.logit(torch.rand(k, c, h, w, generator=gen).clamp(0.01, 0.99)).to(device).requires_grad_()
    opt = torch.optim.Adam([mask_p, pattern_p], lr=lr, betas=tuple(betas))  # NC code: Adam lr 0.1, betas (0.5, 0.9)
    target = torch.tensor(group, device=device)
    cost = torch.full((k,), float(init_cost), device=device)
    up = torch.zeros(k, dtype=torch.long, device=device)
    down = torch.zeros_like(up)
    best_l1 = torch.full((k,), float("inf"), device=device)
    best_mask = torch.zeros(k, 1, h, w, device=device)
    best_pattern = torch.zeros(k, c, h, w, device=device)
    best_acc = torch.zeros(k, device=device)
    bsz = min(int(batch_size), n)
    order, pos = torch.randperm(n, generator=gen), 0
    for step in range(steps):
        if pos + bsz > n:  # a new shuffled pass over the clean images
            order, pos = torch.randperm(n, generator=gen), 0
        xb = x[order[pos:pos + bsz].to(device)]
        pos += bsz
        mask, pattern = torch.sigmoid(mask_p), torch.sigmoid(pattern_p)
        mixed = (1 - mask[:, None]) * xb[None] + (mask * pattern)[:, None]  # (k, B, C, H, W)
        logits = model(mixed.flatten(0, 1)).float()
        ce = F.cross_entropy(logits, target.repeat_interleave(bsz), reduction="none").view(k, bsz).mean(1)
        l1 = mask.flatten(1).sum(1)
        loss = (ce + cost * l1).sum()  # independent per class: each term has its own parameters
        # Gradients for mask/pattern only: the frozen model's parameters get no .grad.
        opt.zero_grad(set_to_none=True)
        mask_p.grad, pattern_p.grad = torch.autograd.grad(loss, [mask_p, pattern_p])
        with torch.no_grad():
            acc = (logits.argmax(1).view(k, bsz) == target[:, None]).float().mean(1)
            ok = acc >= attack_threshold
            better = ok & (l1 < best_l1)  # NC: keep the smallest-ℓ1 mask that reached the threshold
            best_l1 = torch.where(better, l1, best_l1)
            best_acc = torch.where(better, acc, best_acc)
            sel = better[:, None, None, None]  # torch.where, not boolean indexing: no device sync
            best_mask, best_pattern = torch.where(sel, mask, best_mask), torch.where(sel, pattern, best_pattern)
            # NC's λ schedule: `patience` consecutive steps at/above the threshold -> λ × multiplier,
            # `patience` consecutive steps below -> λ ÷ multiplier (NC code divides by multiplier**1.5).
            up, down = torch.where(ok, up + 1, 0), torch.where(ok, 0, down + 1)
            raise_, lower = up >= patience, down >= patience
            cost = torch.where(raise_, cost * cost_multiplier, torch.where(lower, cost / cost_multiplier, cost))
            up, down = torch.where(raise_, 0, up), torch.where(lower, 0, down)
        opt.step()
        if step % 25 == 0 or step == steps - 1:  # .item() syncs the device: only now and then
            progress.update(task, info=f"classes {group[0]}..{group[-1]} ℓ1 min {float(l1.detach().min()):.1f} "
                                       f"λ {float(cost.mean()):.2g} succ {float(acc.mean()):.2f}")
        progress.advance(task)
    reached = torch.isfinite(best_l1)
    with torch.no_grad():  # fall back to the last mask where the threshold was never reached
        last_mask, last_pattern = torch.sigmoid(mask_p), torch.sigmoid(pattern_p)
        sel = reached[:, None, None, None]
        best_mask, best_pattern = torch.where(sel, best_mask, last_mask), torch.where(sel, best_pattern, last_pattern)
        best_l1 = torch.where(reached, best_l1, last_mask.flatten(1).sum(1))
        best_acc = torch.where(reached, best_acc, acc)
    return (best_mask[:, 0].cpu(), best_pattern.cpu(), best_l1.cpu(), best_acc.cpu(), reached.cpu())


def save_mask_grid(triggers: ReversedTriggers, flagged: np.ndarray, path: Path) -> None:
    """PNG: per class its mask (top row) and the masked pattern m⊙p (bottom); flagged in red."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    k = len(triggers.classes)
    fig, axes = plt.subplots(2, k, figsize=(1.6 * k, 3.4), squeeze=False)
    shown = (triggers.mask[:, None] * triggers.pattern).permute(0, 2, 3, 1).numpy()
    for i, c in enumerate(triggers.classes):
        axes[0, i].imshow(triggers.mask[i].numpy(), cmap="gray", vmin=0, vmax=1)
        axes[0, i].set_title(f"{c}: ℓ1 {float(triggers.l1[i]):.1f}", fontsize=8,
                             color="red" if flagged[i] else "black")
        axes[1, i].imshow(shown[i, :, :, 0] if shown.shape[-1] == 1 else shown[i], cmap="gray", vmin=0, vmax=1)
        for ax in axes[:, i]:
            ax.set_xticks([])
            ax.set_yticks([])
    axes[0, 0].set_ylabel("mask", fontsize=8)
    axes[1, 0].set_ylabel("m⊙p", fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


@DEFENSES.register("nc", options=NCOptions, kind=Kind.inspector, score=lambda exp, opts, out: nc_score(exp, opts, out))
def neural_cleanse(ctx: InspectorContext, opts: NCOptions) -> InspectorOutput:
    """Trigger synthesis + MAD test on every class (the defender's part: no class is known)."""
    reserve = ctx.reserve
    rows = np.arange(len(reserve.index))
    if opts.num_images is not None and opts.num_images < len(rows):
        chosen = ctx.rng("nc/images").choice(reserve.index, opts.num_images, replace=False)
        rows = np.searchsorted(reserve.index, np.sort(chosen))
    k = ctx.num_classes
    trig = synthesize_triggers(ctx.view.model, reserve.x[torch.as_tensor(rows)], range(k), ctx.view.device, opts,
                               seed=int(ctx.rng("nc/init").integers(2**62)))
    l1 = trig.l1.numpy()
    index, flagged = anomaly_index(l1, opts.anomaly_threshold)
    records = []
    for c in range(k):
        records.append(record("mask_l1", l1[c], **{"class": c}))
        records.append(record("anomaly_index", index[c], **{"class": c}))
        records.append(record("flagged", float(flagged[c]), **{"class": c}))
        records.append(record("reversed_success", float(trig.success[c]), **{"class": c}))
    log.info("nc: mask l1 %s, anomaly index %s, flagged %s", [round(float(v), 1) for v in l1],
             [round(float(v), 2) for v in index], np.flatnonzero(flagged).tolist())
    if ctx.out_dir is not None and opts.figure:
        save_mask_grid(trig, flagged, Path(ctx.out_dir) / "nc_masks.png")
    return InspectorOutput(records, {"mask_l1": l1, "anomaly_index": index, "flagged": flagged})


def nc_score(exp, opts: NCOptions, out: InspectorOutput) -> list[dict]:
    """The evaluator's part: was the target flagged (ML-MMDR Fig. 8: infected vs uninfected ℓ1),
    and the real-trigger pruning curve (ML-MMDR §6.2, Fig. 10)."""
    t = exp.target
    l1, index, flagged = (out.per_class[k] for k in ("mask_l1", "anomaly_index", "flagged"))
    rows = [record("target_flagged", float(flagged[t])), record("target_anomaly_index", index[t]),
            record("infected_l1", l1[t]), record("uninfected_l1", float(np.delete(l1, t).mean()))]
    log.info("nc: target %d flagged: %s", t, bool(flagged[t]))
    if len(exp.backdoor_test.y_target) and opts.prune:
        rows += pruning_curve(exp, opts)
    return rows
