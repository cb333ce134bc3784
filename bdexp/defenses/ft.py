"""FT: fine-tuning the suspect model on the defender's clean data, the baseline every repair paper
compares against (Liu et al. 2018 §4 fine-tune as a defense on its own; BackdoorBench's `ft`).

Defaults are BackdoorBench's (`config/defense/ft/config.yaml`; the papers name none): 100 epochs
at the run's schedule length (`Repairer.scaled_epochs`: 20 under scale=cpu), batch 256, SGD lr 0.01
with momentum 0.9 and weight decay 5e-4, cosine annealing, on 5 % of the training set (clean rows).
The run's augmentation (crop + flip) applies, as BackdoorBench's training transforms do.
"""
from __future__ import annotations

from dataclasses import dataclass

from bdexp.defenses import DEFENSES
from bdexp.defenses.contexts import Kind
from bdexp.defenses.mitigation import MitigationContext, MitigationOptions
from bdexp.defenses.repair import Repair
from bdexp.options import option
from bdexp.training.loop import ScheduleName


@dataclass(frozen=True)
class FTOptions(MitigationOptions):
    epochs: float = option(100, lo=0, lo_open=True)  # paper epochs (scaled by train.epochs / sanitizer_reference_epochs)
    lr: float = option(0.01, lo=0, lo_open=True)
    batch_size: int = option(256, lo=1)
    schedule: ScheduleName = "cosine"  # training/loop.py


@DEFENSES.register("ft", options=FTOptions, kind=Kind.mitigation)
def fine_tune(ctx: MitigationContext, opts: FTOptions) -> Repair:
    epochs = ctx.scaled_epochs(opts.epochs)
    ctx.finetune(ctx.model, epochs, "ft", lr=opts.lr, batch_size=opts.batch_size, schedule=opts.schedule)
    return Repair(ctx.model, model_epochs=float(epochs))
