"""`defense=ispl` (ISPL + boosting, ISPL §3-4, App. C) and `defense=itlm` (ISPL's ITLM baseline,
App. C) as sanitizers: each returns a keep-mask and the protocol of sanitize.py retrains and
scores it. Their inner models are the defender's too: the sanitizer's `retrain_regime` with the
run's optimiser settings, on batches without poison flags (training/defender.py); each inner
training's lr schedule is named in the defense's config (`iter_schedule`, `learner_schedule`,
`st_schedule`; ITLM `round_schedule`).

Epoch counts in the YAMLs are the paper's (for a 100-epoch schedule); they are multiplied by
train.epochs / `reference_epochs` (at least 1), so `scale=cpu`'s 8-epoch runs scale the defense
down with the rest of the run. `reference_epochs` is the global `sanitizer_reference_epochs`: 100,
and 40 under scale=cpu (why: conf/scale/cpu.yaml).
"""
from __future__ import annotations

import logging

import numpy as np
import torch
from omegaconf import OmegaConf

from bdexp.defenses import DEFENSES
from bdexp.defenses.ispl_boost import ispl_boost
from bdexp.defenses.ispl_core import Metered, TensorTrainer
from bdexp.defenses.sanitize import defender_training, run_sanitizer
from bdexp.errors import ConfigError
from bdexp.training.base import REGIMES
from bdexp.training.loop import SCHEDULES

log = logging.getLogger(__name__)

ISPL_EPOCH_KEYS = ("iter_epochs", "warmup_epochs", "learner_epochs", "st_epochs", "st_interval")
ISPL_SCHEDULE_KEYS = ("iter_schedule", "learner_schedule", "st_schedule")


def check_schedules(cfg, keys) -> None:
    """Each inner training's lr schedule is one of SCHEDULES (before any model is trained)."""
    for key in keys:
        if cfg.get(key) not in SCHEDULES:
            raise ConfigError(f"defense.{cfg.name}.{key}={cfg.get(key)!r}; choose one of {list(SCHEDULES)}")


def scaled_epochs(exp, cfg, value: float) -> int:
    """`value` paper epochs at this run's training length."""
    return max(1, round(float(value) * int(exp.cfg.train.epochs) / float(cfg.reference_epochs)))


def make_trainer(exp, cfg) -> TensorTrainer:
    """Trains the defender's models: the run's model, optimiser settings and augmentation under
    the defense's `retrain_regime` (never the run's regime: it may be the attacker's)."""
    ts = exp.train_set
    train_cfg = defender_training(exp, cfg)
    return TensorTrainer(ts.x, ts.y, exp.cfg.model, train_cfg, exp.device,
                         crop_padding=exp.cfg.dataset.augment.crop_padding, flip=exp.cfg.dataset.augment.flip,
                         eval_batch_size=int(exp.cfg.eval_batch_size), regime=REGIMES.get(str(train_cfg.name)))


def ispl_keep(exp, cfg) -> tuple[torch.Tensor, dict]:
    check_schedules(cfg, ISPL_SCHEDULE_KEYS)
    algo = OmegaConf.to_container(cfg, resolve=True)
    for key in ISPL_EPOCH_KEYS:
        algo[key] = scaled_epochs(exp, cfg, algo[key])
    keep, info = ispl_boost(make_trainer(exp, cfg), exp.train_set.y.numpy(), algo, exp.rng("ispl"))
    arrays = info.pop("arrays", {})
    # The set after boosting alone, so the evaluator can score each stage (FP/FN per stage).
    stages = {"boost": torch.from_numpy(arrays["keep_boost"])} if algo.get("self_training") else {}
    return torch.from_numpy(keep), {"model_epochs": info["cost"]["model_epochs"], "stages": stages, **info}


def itlm_fraction(cfg) -> float:
    """ITLM's kept fraction: `keep_fraction`, else 98 % at ε = 5 % scaled linearly with the ε the
    defender is told (`eps`; ISPL App. C: "α = 96% for ε = 10% and α = 92% for ε = 20%")."""
    if cfg.get("keep_fraction") is not None:
        frac = float(cfg.get("keep_fraction"))
        if not 0.0 < frac <= 1.0:
            raise ConfigError(f"defense.itlm.keep_fraction={frac:g} must be in (0, 1]")
        return frac
    if cfg.get("eps") is None:
        raise ConfigError("defense.itlm: set keep_fraction, or eps (the poison fraction the defender assumes)")
    eps = float(cfg.get("eps"))
    if not 0.0 <= eps < 1.0:
        raise ConfigError(f"defense.itlm.eps={eps:g} must be in [0, 1) (or set keep_fraction)")
    return 1.0 - (0.02 / 0.05) * eps


def itlm_keep(exp, cfg) -> tuple[torch.Tensor, dict]:
    """ITLM (Shen & Sanghavi; ISPL §4, App. C): train, keep the lowest-loss fraction, retrain from
    a fresh model ("a fresh model beginning each iteration"), repeat. Each round's model has its
    own `round_schedule` over that round's epochs."""
    check_schedules(cfg, ("round_schedule",))
    frac = itlm_fraction(cfg)
    trainer = Metered(make_trainer(exp, cfg))
    y = exp.train_set.y.numpy()
    keep = np.ones(len(y), dtype=bool)
    for r in range(int(cfg.rounds)):
        epochs = scaled_epochs(exp, cfg, cfg.first_epochs if r == 0 else cfg.next_epochs)
        model = trainer.fit(np.flatnonzero(keep), epochs, seed=exp.seed + r, describe=f"itlm round {r + 1}",
                            schedule=str(cfg.round_schedule), schedule_epochs=epochs)
        loss = -trainer.log_probs(model, np.arange(len(y)))[np.arange(len(y)), y]
        keep = np.zeros(len(y), dtype=bool)
        keep[np.argsort(loss, kind="stable")[: int(round(frac * len(y)))]] = True
        log.info("itlm round %d: kept %d of %d (fraction %.3f)", r + 1, keep.sum(), len(y), frac)
    return torch.from_numpy(keep), {"model_epochs": trainer.model_epochs, "keep_fraction": frac}


@DEFENSES.register("ispl")
def ispl(exp, cfg) -> list[dict]:
    return run_sanitizer(exp, cfg, ispl_keep)


@DEFENSES.register("itlm")
def itlm(exp, cfg) -> list[dict]:
    return run_sanitizer(exp, cfg, itlm_keep)
