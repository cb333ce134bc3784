"""`defense=ispl` (ISPL + boosting, ISPL §3-4, App. C) and `defense=itlm` (ISPL's ITLM baseline,
App. C) as sanitizers: each returns a keep-mask and the protocol of sanitize.py retrains and
scores it. Their inner models are the defender's too: the sanitizer's `retrain_regime` with the
run's optimiser settings, on batches without poison flags (training/defender.py); each inner
training's lr schedule is named in the defense's config (`iter_schedule`, `learner_schedule`,
`st_schedule`; ITLM `round_schedule`).

Epoch counts in the YAMLs are the paper's (for a 100-epoch schedule); they are multiplied by
train.epochs / `reference_epochs` (at least 1), so `scale=cpu`'s 8-epoch runs scale the defense
down with the rest of the run. `reference_epochs` (null) is the run's `sanitizer_reference_epochs`,
which the evaluator hands every sanitizer in its context: 100, and 40 under scale=cpu (why:
conf/scale/cpu.yaml); a preset may set the defense's own.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch

from bdexp.defenses import DEFENSES
from bdexp.defenses.contexts import Kind, SanitizerContext
from bdexp.defenses.ispl_boost import ispl_boost
from bdexp.defenses.ispl_core import ISPLOptions, Metered
from bdexp.defenses.sanitize import SanitizerOptions
from bdexp.errors import ConfigError
from bdexp.training.loop import ScheduleName
from bdexp.options import option

log = logging.getLogger(__name__)

ISPL_EPOCH_KEYS = ("iter_epochs", "warmup_epochs", "learner_epochs", "st_epochs", "st_interval")


@dataclass(frozen=True)
class ISPLDefenseOptions(SanitizerOptions, ISPLOptions):
    """conf/defense/ispl.yaml: the algorithm's settings (ispl_core.ISPLOptions) plus the defender's
    regime and the schedule length its paper epochs assume."""

    reference_epochs: float | None = option(None, lo=0, lo_open=True)  # null: the run's sanitizer_reference_epochs


@dataclass(frozen=True)
class ITLMOptions(SanitizerOptions):
    """conf/defense/itlm.yaml explains each value."""

    keep_fraction: float | None = option(None, lo=0, hi=1, lo_open=True)
    eps: float | None = option(0.1, lo=0, hi=1, hi_open=True)  # the poison fraction the defender assumes
    rounds: int = option(3, lo=1)
    first_epochs: float = option(80, lo=0)
    next_epochs: float = option(40, lo=0)
    round_schedule: ScheduleName = "step"
    reference_epochs: float | None = option(None, lo=0, lo_open=True)  # null: the run's sanitizer_reference_epochs


def scaled(ctx: SanitizerContext, opts, paper_epochs: float) -> int:
    """`paper_epochs` at this run's training length; the defense's own `reference_epochs` when set."""
    if opts.reference_epochs is None:
        return ctx.scaled_epochs(paper_epochs)
    return max(1, round(float(paper_epochs) * ctx.train_epochs / float(opts.reference_epochs)))


@DEFENSES.register("ispl", options=ISPLDefenseOptions, kind=Kind.sanitizer)
def ispl_keep(ctx: SanitizerContext, opts: ISPLDefenseOptions) -> tuple[torch.Tensor, dict]:
    algo = opts.replace(**{key: scaled(ctx, opts, getattr(opts, key)) for key in ISPL_EPOCH_KEYS})
    keep, info = ispl_boost(ctx.make_trainer(), ctx.y.numpy(), algo, ctx.rng("ispl"))
    arrays = info.pop("arrays", {})
    # The set after boosting alone, so the evaluator can score each stage (FP/FN per stage).
    stages = {"boost": torch.from_numpy(arrays["keep_boost"])} if algo.self_training else {}
    return torch.from_numpy(keep), {"model_epochs": info["cost"]["model_epochs"], "stages": stages, **info}


def itlm_fraction(opts: ITLMOptions) -> float:
    """ITLM's kept fraction: `keep_fraction`, else 98 % at ε = 5 % scaled linearly with the ε the
    defender is told (`eps`; ISPL App. C: "α = 96% for ε = 10% and α = 92% for ε = 20%")."""
    if opts.keep_fraction is not None:
        return opts.keep_fraction
    if opts.eps is None:
        raise ConfigError("defense.itlm: set keep_fraction, or eps (the poison fraction the defender assumes)")
    return 1.0 - (0.02 / 0.05) * opts.eps


@DEFENSES.register("itlm", options=ITLMOptions, kind=Kind.sanitizer)
def itlm_keep(ctx: SanitizerContext, opts: ITLMOptions) -> tuple[torch.Tensor, dict]:
    """ITLM (Shen & Sanghavi; ISPL §4, App. C): train, keep the lowest-loss fraction, retrain from
    a fresh model ("a fresh model beginning each iteration"), repeat. Each round's model has its
    own `round_schedule` over that round's epochs."""
    frac = itlm_fraction(opts)
    trainer = Metered(ctx.make_trainer())
    y = ctx.y.numpy()
    keep = np.ones(len(y), dtype=bool)
    for r in range(opts.rounds):
        epochs = scaled(ctx, opts, opts.first_epochs if r == 0 else opts.next_epochs)
        model = trainer.fit(np.flatnonzero(keep), epochs, seed=ctx.seed + r, describe=f"itlm round {r + 1}",
                            schedule=opts.round_schedule, schedule_epochs=epochs)
        loss = -trainer.log_probs(model, np.arange(len(y)))[np.arange(len(y)), y]
        keep = np.zeros(len(y), dtype=bool)
        keep[np.argsort(loss, kind="stable")[: int(round(frac * len(y)))]] = True
        log.info("itlm round %d: kept %d of %d (fraction %.3f)", r + 1, keep.sum(), len(y), frac)
    return torch.from_numpy(keep), {"model_epochs": trainer.model_epochs, "keep_fraction": frac}
