"""FT-SAM: fine-tuning with sharpness-aware minimization (Zhu et al., "Enhancing Fine-Tuning Based
Backdoor Defense with Sharpness-Aware Minimization", ICCV 2023).

The suspect model is fine-tuned on the defender's clean data, each step a SAM step (Foret et al.,
ICLR 2021, §2-3): the gradient g of the loss at the weights w gives the worst-case perturbation
ε within radius ρ, the gradient is taken again at w + ε, and that gradient is applied at w:

    ε = ρ · g / ||g||₂                              (SAM, `adaptive=False`)
    ε = ρ · T_w² g / ||T_w g||₂,  T_w = diag(|w|)    (ASAM, Kwon et al. 2021; `adaptive=True`)
    w ← optimizer step with ∇L(w + ε)

FT-SAM fine-tunes under the adaptive (scale-invariant) neighbourhood ||T_w⁻¹ ε||₂ ≤ ρ with a large
radius, so that the neurons the backdoor relies on, whose weights are large, are perturbed most
(FT-SAM §4). The loss is cross-entropy with label smoothing (BackdoorBench's
`smooth_crossentropy`: 1 − s on the label, s/(K−1) on each other class). BatchNorm running
statistics are updated by the first pass only (the pass at w + ε leaves them as they were, as
BackdoorBench's SAM does).

Defaults: BackdoorBench's config/defense/ft-sam/config.yaml and defense/ft-sam.py (the FT-SAM
authors' release): 100 epochs (scaled by the run's schedule length, `Repairer.scaled_epochs`:
20 under scale=cpu), batch 256, SGD lr 0.01 with the run's momentum (0.9) and weight decay (5e-4 in
BackdoorBench), cosine annealing, ρ = 2.0 (rho_max = rho_min: constant), adaptive (its `--adaptive`
flag is store_false: on unless given), label smoothing 0.1, on 5 % of the training set (clean rows).

Where bdexp departs: BackdoorBench steps its CosineAnnealingLR (T_max = epochs) once per *batch*,
so its rate runs through a full cosine every 2·epochs batches and rises again; bdexp anneals once
per epoch over the fine-tune (training/loop.py), as FT does. Its GSAM-style gradient decomposition
(`alpha`) is 0 in every config and is left out. Cost: model_epochs = epochs as for FT, but each
step takes two forward-backward passes (about twice FT's compute per epoch; see wall_s).
"""
from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from bdexp.defenses import DEFENSES
from bdexp.defenses.contexts import Kind
from bdexp.defenses.mitigation import MitigationContext, MitigationOptions
from bdexp.defenses.repair import Repair
from bdexp.errors import TrainingDiverged
from bdexp.options import option
from bdexp.results import record
from bdexp.training.loop import Optimization, ScheduleName


@dataclass(frozen=True)
class FTSAMOptions(MitigationOptions):
    epochs: float = option(100, lo=0, lo_open=True)  # paper epochs (scaled by train.epochs / sanitizer_reference_epochs)
    lr: float = option(0.01, lo=0, lo_open=True)
    batch_size: int = option(256, lo=1)
    schedule: ScheduleName = "cosine"  # training/loop.py, once per epoch
    rho: float = option(2.0, lo=0)  # the neighbourhood radius (BackdoorBench rho_max = rho_min)
    adaptive: bool = True  # ASAM's scale-invariant neighbourhood (BackdoorBench's default)
    label_smoothing: float = option(0.1, lo=0, hi=1, hi_open=True)


def smoothed_cross_entropy(logits: torch.Tensor, y: torch.Tensor, smoothing: float) -> torch.Tensor:
    """Cross-entropy against soft targets 1 − s on the label and s/(K−1) on each other class (mean
    over the batch); s = 0 is plain cross-entropy."""
    if smoothing == 0:
        return F.cross_entropy(logits, y)
    k = logits.shape[1]
    target = torch.full_like(logits, smoothing / (k - 1), dtype=torch.float32)
    target.scatter_(1, y.unsqueeze(1), 1.0 - smoothing)
    return -(target * F.log_softmax(logits.float(), dim=1)).sum(dim=1).mean()


@contextmanager
def batchnorm_stats_kept(model: nn.Module) -> Iterator[None]:
    """Run forward passes in train mode without moving the BatchNorm running statistics (they are
    put back exactly afterwards)."""
    saved = [(m, m.running_mean.clone(), m.running_var.clone(), m.num_batches_tracked.clone())
             for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats
             and m.running_mean is not None]
    try:
        yield
    finally:
        with torch.no_grad():
            for m, mean, var, count in saved:
                m.running_mean.copy_(mean)
                m.running_var.copy_(var)
                m.num_batches_tracked.copy_(count)


def sam_step(model: nn.Module, closure: Callable[[], tuple[torch.Tensor, torch.Tensor]],
             optimizer: torch.optim.Optimizer, rho: float, adaptive: bool = False,
             eps: float = 1e-12) -> tuple[torch.Tensor, torch.Tensor]:
    """One sharpness-aware step: the gradient at w gives ε (ρ·g/||g||, or ρ·w²g/||·|w|g|| when
    `adaptive`), the gradient is recomputed at w + ε (BatchNorm statistics untouched) and the
    `optimizer` steps from w with it. `closure()` runs the forward pass and returns (loss, logits).
    Returns the loss and logits of the first pass (at w), detached."""
    params = [p for group in optimizer.param_groups for p in group["params"] if p.requires_grad]
    optimizer.zero_grad(set_to_none=True)
    loss, logits = closure()
    loss.backward()
    live = [p for p in params if p.grad is not None]
    with torch.no_grad():
        scaled = [p.grad * p.abs() if adaptive else p.grad for p in live]
        norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(s).to(live[0].dtype) for s in scaled]))
        scale = rho / (norm + eps)
        origin = [p.detach().clone() for p in live]
        for p in live:
            e = p.grad * scale.to(p.dtype)
            if adaptive:
                e = e * p * p  # T_w² g with T_w = |w|
            p.add_(e)
    optimizer.zero_grad(set_to_none=True)
    with batchnorm_stats_kept(model):
        perturbed_loss, _ = closure()
        perturbed_loss.backward()
    with torch.no_grad():
        for p, w in zip(live, origin):
            p.copy_(w)  # back to w exactly; the step uses the gradient taken at w + ε
    optimizer.step()
    return loss.detach(), logits.detach()


@DEFENSES.register("ftsam", options=FTSAMOptions, kind=Kind.mitigation)
def fine_tune_sam(ctx: MitigationContext, opts: FTSAMOptions) -> Repair:
    epochs = ctx.scaled_epochs(opts.epochs)
    model = ctx.model
    sched = dataclasses.replace(ctx.schedule, epochs=epochs, lr=float(opts.lr), batch_size=int(opts.batch_size))
    optim = Optimization(model, sched, schedule=opts.schedule)
    loader = ctx.loader("ftsam", opts.batch_size, drop_last=True)
    on_cuda = ctx.device.type == "cuda"
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if on_cuda and sched.amp else nullcontext()
    loss_sum, seen = 0.0, 0
    for epoch in ctx.epochs("ftsam", epochs, model, optim, loader):
        optim.begin_epoch(epoch)
        model.train()
        loss_sum, seen = torch.zeros((), device=ctx.device), 0
        for batch in loader:
            def closure(x=batch.x, y=batch.y):
                with autocast:
                    logits = model(x)
                return smoothed_cross_entropy(logits, y, opts.label_smoothing), logits

            loss, _ = sam_step(model, closure, optim.opt, opts.rho, adaptive=opts.adaptive)
            loss_sum = loss_sum + loss.float() * len(batch.y)
            seen += len(batch.y)
        optim.epochs_done = epoch + 1
        mean = float(loss_sum) / max(seen, 1)
        if not math.isfinite(mean):
            raise TrainingDiverged(f"FT-SAM's loss became {mean} at epoch {epoch + 1} (lr={opts.lr}, rho={opts.rho}); "
                                   "lower defense.ftsam.lr or defense.ftsam.rho")
    model.eval()
    records = [record("ftsam_train_loss", float(loss_sum) / max(seen, 1))] if seen else []
    return Repair(model, model_epochs=float(epochs), records=records)
