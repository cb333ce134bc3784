"""ABL: Anti-Backdoor Learning (Li, Lyu, Koren, Lyu, Li, Ma, NeurIPS 2021, "Anti-Backdoor Learning:
Training Clean Models on Poisoned Data"; BackdoorBench's `abl`). A training-time defense: the
defender trains its own model on the poisoned training set as given (images, given labels; never
the poison flags) and returns it with the rows it isolated as suspect.

ABL §3 observes that backdoor examples are learnt much faster than clean ones (their loss falls
first and lowest), and that the backdoor is tied to the target class. Its two stages (ABL §4, Alg. 1):
1. *Backdoor isolation* (epochs [0, T_te)): a fresh model is trained with local gradient ascent
   (LGA, ABL §4): L = sign(ℓ − γ) · ℓ. Once the loss falls below γ the step ascends instead of
   descending, which holds the clean examples' loss near γ while the backdoor examples, learnt
   fastest, fall well below it. After T_te epochs the fraction p of the rows
   with the lowest loss (the isolation model's per-example cross-entropy, eval mode, unaugmented)
   is isolated as D̂_b; the rest is D̂_c.
2. *Backdoor unlearning* (epochs [T_te, T)): the model is trained further on D̂_c with plain
   cross-entropy (BackdoorBench's `finetuning_ascent_model`, `finetuning_epochs`: what brings the
   clean accuracy up to a normal model's), then trained to MAXIMISE the cross-entropy on D̂_b
   (gradient ascent, ABL §4), which breaks the link between the trigger and
   the target class.

Defaults: the paper (ABL §5: T_te = 20 isolation epochs, γ = 0.5, p = 1 %, unlearning 20 epochs
at lr 5e-4, T = 100 epochs in all) and, where it names none, BackdoorBench's
`config/defense/abl/config.yaml`: SGD with Nesterov momentum 0.9, weight decay 1e-4, batch 256,
isolation lr 0.01, fine-tuning on the rest for 60 epochs from lr 0.1 (`lr_finetuning_init`; × 0.1
after epoch 40, the authors' schedule, github.com/bboylyg/ABL `backdoor_unlearning.py`), no
augmentation while isolating (both references) and unlearning (the authors'), the run's while
fine-tuning. The authors' code uses batch 64 and isolation lr 0.1; BackdoorBench's code overrides
its config's fine-tuning lr (0.01 → 0.001) and unlearning lr (1e-4), and its config's gradient
ascent type is `Flooding` (|L̄ − b| + b, b = 0.5: `ascent=flooding` here).

Where bdexp departs or chooses (docs/defenses.md, "ABL"):
- LGA is applied to the batch-mean loss (`lga_per=batch`), as both references' code does:
  sign(L̄ − γ) · L̄. ABL §4's formula reads as a mean of sign(ℓ − γ) · ℓ over examples (`lga_per=example`);
  that form also pushes each backdoor example whose loss falls below γ back up. On the tests' tiny
  digits run (isolating 1 % after 1 to 8 isolation epochs) the batch form's precision was 1.0 after
  epochs 1–7, the per-example form's 0.0–0.4 from epoch 5 on.
- The isolated set is the ⌊p · n⌋ lowest-loss rows (at least 1), ties by row order.
- Epoch counts are paper epochs scaled by the run's schedule length (`Repairer.scaled_epochs`).
- Each stage has its own optimiser (the references carry one optimizer's momentum from the
  fine-tuning into the unlearning).
"""
from __future__ import annotations

import logging
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn

from bdexp.defenses import DEFENSES
from bdexp.defenses.contexts import Kind
from bdexp.defenses.repair import Repair
from bdexp.defenses.training_time import TrainingContext
from bdexp.errors import TrainingDiverged
from bdexp.options import Options, option
from bdexp.results import record
from bdexp.training.loop import milestone_epochs

log = logging.getLogger(__name__)

# The authors' optimiser in every stage (bboylyg/ABL config.py; BackdoorBench the same).
MOMENTUM, WEIGHT_DECAY, NESTEROV = 0.9, 1e-4, True
LR_DROP = 0.1  # the fine-tuning's lr step (0.1 -> 0.01 at epoch 40 of 60)


@dataclass(frozen=True)
class ABLOptions(Options):
    batch_size: int = option(256, lo=1)  # BackdoorBench (the authors' code: 64)
    # stage 1: backdoor isolation
    # T_te (ABL §5; BackdoorBench tuning_epochs); paper epochs, scaled like all epochs here
    isolation_epochs: float = option(20, lo=0, lo_open=True)
    isolation_ratio: float = option(0.01, lo=0, hi=1, lo_open=True)  # p (ABL §5; BackdoorBench isolation_ratio)
    isolation_lr: float = option(0.01, lo=0, lo_open=True)  # BackdoorBench's lr (the authors' code: 0.1)
    # lga: sign(L - γ)·L (ABL §4) | flooding: |L - γ| + γ (BackdoorBench's default; the same gradient as batch lga)
    ascent: Literal["lga", "flooding"] = "lga"
    gamma: float = option(0.5, lo=0)  # γ, the LGA threshold (ABL §5) / the flooding level (BackdoorBench: both 0.5)
    # batch: the sign of the batch-mean loss (both references' code) | example: each example's own
    lga_per: Literal["batch", "example"] = "batch"
    # stage 2: training on the rest, then unlearning the isolated rows
    finetune: bool = True  # BackdoorBench's finetuning_ascent_model
    # BackdoorBench's finetuning_epochs (20 + 60 + 20 = ABL's T = 100)
    finetune_epochs: float = option(60, lo=0, lo_open=True)
    finetune_lr: float = option(0.1, lo=0, lo_open=True)  # BackdoorBench lr_finetuning_init, the authors' lr
    # lr × 0.1 at epoch 40 of 60 (the authors' code)
    finetune_milestones: tuple[float, ...] = option([0.6667], lo=0, hi=1)
    unlearning_epochs: float = option(20, lo=0, lo_open=True)  # ABL §5, BackdoorBench unlearning_epochs
    unlearning_lr: float = option(5e-4, lo=0, lo_open=True)  # ABL §5, BackdoorBench lr_unlearning_init


def lga_loss(losses: torch.Tensor, gamma: float, per: str = "batch") -> torch.Tensor:
    """Local gradient ascent (ABL §4) of a batch's per-example losses ℓ: sign(L̄ − γ) · L̄ of
    their mean L̄ (`per="batch"`, the references' code), or the mean of sign(ℓ − γ) · ℓ (`per="example"`)."""
    if per == "batch":
        mean = losses.mean()
        return torch.sign(mean - gamma) * mean
    return (torch.sign(losses - gamma) * losses).mean()


def flooding_loss(losses: torch.Tensor, level: float) -> torch.Tensor:
    """Flooding (Ishida et al. 2020) of the batch-mean loss, BackdoorBench's ABL default: |L̄ − b| + b."""
    return (losses.mean() - level).abs() + level


def isolate_lowest(losses: torch.Tensor, ratio: float) -> torch.Tensor:
    """A bool mask of the ⌊ratio · n⌋ (at least 1) rows with the lowest loss, ties by row order."""
    n = len(losses)
    k = min(n, max(1, int(n * float(ratio))))
    order = torch.argsort(losses.detach().cpu().double(), stable=True)
    mask = torch.zeros(n, dtype=torch.bool)
    mask[order[:k]] = True
    return mask


@torch.no_grad()
def example_losses(ctx: TrainingContext, model: nn.Module) -> torch.Tensor:
    """Each row's cross-entropy under `model` (eval mode, unaugmented), on the CPU."""
    logits = ctx.view(model).logits(ctx.x)
    return nn.functional.cross_entropy(logits, ctx.y.to(logits.device).long(), reduction="none")


def train_stage(ctx: TrainingContext, model: nn.Module, tag: str, epochs: int, lr: Callable[[int], float],
                loss: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], batch_size: int,
                rows: torch.Tensor | None = None, augment: bool = True) -> None:
    """`epochs` epochs of SGD (the authors' optimiser) on `rows` of the training set, `loss(logits, y)`
    minimised, rate `lr(epoch)`; resumable (Repairer.epochs). A last partial batch is dropped when
    there is more than one batch (as `Repairer.finetune`: no one-image BatchNorm batch)."""
    opt = torch.optim.SGD(model.parameters(), lr=lr(0), momentum=MOMENTUM, weight_decay=WEIGHT_DECAY,
                          nesterov=NESTEROV)
    loader = ctx.loader(tag, batch_size, rows=rows, augment=augment, drop_last=True)
    for epoch in ctx.epochs(tag, epochs, model, opt, loader):
        for group in opt.param_groups:
            group["lr"] = lr(epoch)
        model.train()
        total, seen = 0.0, 0
        for batch in loader:
            value = loss(model(batch.x), batch.y)
            opt.zero_grad(set_to_none=True)
            value.backward()
            opt.step()
            total += float(value.detach()) * len(batch.y)
            seen += len(batch.y)
        if not math.isfinite(total):
            raise TrainingDiverged(f"abl: the {tag} loss became {total / max(seen, 1)} at epoch {epoch + 1}; "
                                   "lower its learning rate (defense.abl.*_lr)")
    model.eval()


@DEFENSES.register("abl", options=ABLOptions, kind=Kind.training_time)
def anti_backdoor_learning(ctx: TrainingContext, opts: ABLOptions) -> Repair:
    model = ctx.make_model("abl")
    n = len(ctx.y)

    # stage 1: isolation with LGA (or flooding), no augmentation (both references)
    def ascent(logits, y):
        losses = nn.functional.cross_entropy(logits, y, reduction="none")
        return flooding_loss(losses, opts.gamma) if opts.ascent == "flooding" else lga_loss(losses, opts.gamma,
                                                                                              opts.lga_per)

    iso_epochs = ctx.scaled_epochs(opts.isolation_epochs)
    train_stage(ctx, model, "abl/isolate", iso_epochs, lambda e: opts.isolation_lr, ascent, opts.batch_size,
                augment=False)
    losses = example_losses(ctx, model)
    isolated = isolate_lowest(losses, opts.isolation_ratio)
    k = int(isolated.sum())
    rest, suspect = torch.nonzero(~isolated).flatten(), torch.nonzero(isolated).flatten()

    # stage 2a: train on the rest (the run's augmentation)
    ft_epochs = ctx.scaled_epochs(opts.finetune_epochs) if opts.finetune else 0
    if ft_epochs:
        drops = milestone_epochs(opts.finetune_milestones, ft_epochs)
        train_stage(ctx, model, "abl/finetune", ft_epochs,
                    lambda e: opts.finetune_lr * LR_DROP ** sum(e >= m for m in drops),
                    nn.functional.cross_entropy, opts.batch_size, rows=rest, augment=True)

    # stage 2b: unlearn the isolated rows by gradient ascent, no augmentation (the authors' code)
    un_epochs = ctx.scaled_epochs(opts.unlearning_epochs)
    train_stage(ctx, model, "abl/unlearn", un_epochs, lambda e: opts.unlearning_lr,
                lambda logits, y: -nn.functional.cross_entropy(logits, y), opts.batch_size, rows=suspect,
                augment=False)

    cut = float(losses[isolated].max())
    log.info("abl: isolated %d of %d rows (loss <= %.4f) after %d LGA epochs; %d fine-tuning, %d unlearning epochs",
             k, n, cut, iso_epochs, ft_epochs, un_epochs)
    cost = iso_epochs + ft_epochs * (n - k) / n + un_epochs * k / n  # one epoch over all n rows counts 1
    records = [record("abl_loss_cut", cut), record("abl_isolation_epochs", float(iso_epochs))]
    return Repair(model, model_epochs=float(cost), records=records, isolated=isolated)
