"""`defense=ispl` (ISPL + boosting, SPEC §5.4) and `defense=itlm` (ISPL's ITLM baseline) as
sanitizers: each returns a keep-mask and the protocol of sanitize.py retrains and scores it.

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
from bdexp.defenses.sanitize import run_sanitizer

log = logging.getLogger(__name__)

ISPL_EPOCH_KEYS = ("iter_epochs", "warmup_epochs", "learner_epochs", "st_epochs", "st_interval")


def scaled_epochs(exp, cfg, value: float) -> int:
    """`value` paper epochs at this run's training length."""
    return max(1, round(float(value) * int(exp.cfg.train.epochs) / float(cfg.reference_epochs)))


def make_trainer(exp) -> TensorTrainer:
    """Trains models like the run's own (same model, optimizer settings and augmentation)."""
    ts = exp.train_set
    return TensorTrainer(ts.x, ts.y, exp.cfg.model, exp.cfg.train, exp.device,
                         crop_padding=exp.cfg.dataset.augment.crop_padding, flip=exp.cfg.dataset.augment.flip,
                         eval_batch_size=int(exp.cfg.eval_batch_size))


def ispl_keep(exp, cfg) -> tuple[torch.Tensor, dict]:
    algo = OmegaConf.to_container(cfg, resolve=True)
    for key in ISPL_EPOCH_KEYS:
        algo[key] = scaled_epochs(exp, cfg, algo[key])
    keep, info = ispl_boost(make_trainer(exp), exp.train_set.y.numpy(), algo, exp.rng("ispl"))
    info.pop("arrays", None)
    return torch.from_numpy(keep), {"model_epochs": info["cost"]["model_epochs"], **info}


def itlm_keep(exp, cfg) -> tuple[torch.Tensor, dict]:
    """ITLM (Shen & Sanghavi; ISPL §4): train, keep the lowest-loss fraction, retrain from a fresh
    model, repeat. Kept fraction 98 % at ε = 5 %, scaled linearly with ε (ISPL App. C)."""
    eps = float(exp.cfg.attack.get("poison_rate") or 0.0)
    frac = cfg.keep_fraction if cfg.keep_fraction is not None else 1.0 - (0.02 / 0.05) * eps
    trainer = Metered(make_trainer(exp))
    y = exp.train_set.y.numpy()
    keep = np.ones(len(y), dtype=bool)
    for r in range(int(cfg.rounds)):
        epochs = scaled_epochs(exp, cfg, cfg.first_epochs if r == 0 else cfg.next_epochs)
        model = trainer.fit(np.flatnonzero(keep), epochs, seed=exp.seed + r, describe=f"itlm round {r + 1}")
        loss = -trainer.log_probs(model, np.arange(len(y)))[np.arange(len(y)), y]
        keep = np.zeros(len(y), dtype=bool)
        keep[np.argsort(loss, kind="stable")[: int(round(frac * len(y)))]] = True
        log.info("itlm round %d: kept %d of %d (fraction %.3f)", r + 1, keep.sum(), len(y), frac)
    return torch.from_numpy(keep), {"model_epochs": trainer.model_epochs}


@DEFENSES.register("ispl")
def ispl(exp, cfg) -> list[dict]:
    return run_sanitizer(exp, cfg, ispl_keep)


@DEFENSES.register("itlm")
def itlm(exp, cfg) -> list[dict]:
    return run_sanitizer(exp, cfg, itlm_keep)
