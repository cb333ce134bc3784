"""The sanitizer protocol (ISPL §4, Table 2): a defense returns a keep-mask over the poisoned
training set; the pipeline retrains a fresh model on the kept rows and the evaluator reports
C (clean accuracy), A (TMR, ISPL eq. 7), FP (clean samples removed), FN (poisoned samples kept)
and the defense's cost. Baselines that need no model live here: `nd` (no defense) and `oracle`
(train on the clean part only — it reads the poison flags, as an oracle must).

The retraining is the defender's (training/defender.py): the regime named by the sanitizer's
`retrain_regime` (standard: plain cross-entropy) with the run's optimiser schedule, on batches
without poison flags — never the run's `train` regime, which under train=mlmmdr is the
attacker's and reads the flags. ND alone keeps the run's own model (it removes nothing and
trains nothing).

Threat models that do not compose: ML-MMDR's attacker "has complete control over the training
data and the training procedure" (ML-MMDR §3.1), while ISPL's defender trains on the data it is
given ("the training algorithm A is fixed", ISPL App. D.2.1). When the run's model was trained
the attacker's way (a regime that reads the poison flags, or an attack that changes rows during
training: WaNet's noise mode) every sanitizer record set gets `threat_model_conflict` = 1, so
tables can print "n/a" instead of a number, and the run logs one warning.
"""
from __future__ import annotations

import hashlib
import logging
import time
from typing import Callable

import numpy as np
import torch
from omegaconf import DictConfig

from bdexp import metrics
from bdexp.defenses import DEFENSES
from bdexp.evaluate import predict
from bdexp.results import record
from bdexp.training.base import REGIMES
from bdexp.training.defender import defender_train_cfg
from bdexp.training.fit import fit

log = logging.getLogger(__name__)

# (exp, cfg) -> (keep: bool tensor over the training set, info: {"model_epochs": ..., ...}).
# info["stages"] (optional): {stage name: bool keep-mask} of intermediate sets (ISPL: the set after
# boosting, before self-training); the evaluator scores each as records fp_<stage> and fn_<stage>.
KeepFn = Callable[..., tuple[torch.Tensor, dict]]


def defender_training(exp, dcfg) -> DictConfig:
    """The train config of the defender's models: `retrain_regime` with the run's schedule."""
    name = dcfg.get("name", "sanitizer")
    return defender_train_cfg(exp.cfg.train, dcfg.get("retrain_regime", None), f"defense.{name}.retrain_regime")


def threat_model_conflict(exp) -> str | None:
    """Why the run's model assumes an attacker who trains it (module docstring), or None."""
    train = str(exp.cfg.train.name)
    if REGIMES.get(train).reads_poison_flags:
        return (f"train={train} is the attacker's training (its loss reads the poison flags; ML-MMDR §3.1: the "
                "attacker controls the training procedure)")
    if bool(exp.train_set.cross.any()):
        return "the attack changes rows while the model trains (WaNet noise mode): the attacker trains the model"
    return None


def _warn_conflict_once(exp, why: str) -> None:
    if not exp.info.get("threat_model_conflict_warned"):
        exp.info["threat_model_conflict_warned"] = True
        log.warning("threat models do not compose: %s, while training-set sanitizers assume the defender trains "
                    "on the data it is given (ISPL §3.1). Sanitizer results of this run carry "
                    "threat_model_conflict=1", why)


def run_sanitizer(exp, dcfg, keep_fn: KeepFn, retrain: bool = True) -> list[dict]:
    """Sanitize, retrain on the kept set with the defender's regime (cached by the mask's hash)
    and score the result. `retrain=False` (ND only) scores the run's own model."""
    name = dcfg.get("name", "sanitizer")
    train_cfg = defender_training(exp, dcfg) if retrain else None
    start = time.perf_counter()
    keep, info = keep_fn(exp, dcfg)
    keep = _mask(keep, exp, name)
    stages = {stage: _mask(mask, exp, f"{name} ({stage})") for stage, mask in (info.pop("stages", None) or {}).items()}
    defense_s = time.perf_counter() - start
    kept = keep.nonzero().flatten()
    if not retrain:
        if not keep.all():
            raise ValueError(f"{name}: only a sanitizer that keeps every row may score the run's own model")
        model, from_cache = exp.model, True
    else:
        # Keep-all: no mask in the key, so a defender's training identical to the run's shares its model.
        extra = None if keep.all() else {
            "keep": hashlib.sha256(np.packbits(keep.numpy()).tobytes()).hexdigest()[:16]}
        model, fit_info = fit(exp.cfg, exp.data, exp.attack, exp.train_set, exp.device, exp.cache,
                              train_cfg=train_cfg, keep=None if extra is None else kept, key_extra=extra,
                              describe=f"{name}: retrain", defender=True)
        from_cache = fit_info["cache"] == "hit"
    bs = int(exp.cfg.eval_batch_size)
    pred_clean = predict(model, exp.data.x_test, exp.device, bs)
    poison = exp.train_set.poison
    rows = [
        record("c", metrics.accuracy(pred_clean, exp.data.y_test)),
        record("fp", float((~keep & ~poison).sum())),  # clean samples removed
        record("fn", float((keep & poison).sum())),  # poisoned samples kept
        record("n_removed", float((~keep).sum())),
        record("n_poison", float(poison.sum())),
        *[rec for stage, mask in stages.items() for rec in (
            record(f"fp_{stage}", float((~mask & ~poison).sum())),
            record(f"fn_{stage}", float((mask & poison).sum())))],
        record("defense_wall_s", defense_s),
        record("model_epochs", float(info.get("model_epochs", 0))),
        record("retrain_cache", 1.0 if from_cache else 0.0),  # ND: the run's model, nothing trained
    ]
    bd = exp.backdoor_test
    if len(bd.y_target):
        pred_bd = predict(model, bd.x, exp.device, bs)
        rows.append(record("a", metrics.targeted_misclassification_rate(pred_clean[bd.index], bd.y_true,
                                                                         pred_bd, bd.y_target)))
        rows.append(record("asr", metrics.attack_success_rate(pred_bd, bd.y_target)))
    conflict = threat_model_conflict(exp)
    if conflict is not None:
        _warn_conflict_once(exp, conflict)
        rows.append(record("threat_model_conflict", 1.0))
    # Which regime trained the scored model: the defender's, or the run's own for ND.
    regime = str(train_cfg.name) if train_cfg is not None else f"run:{exp.cfg.train.name}"
    rows = [{**row, "retrain_regime": regime} for row in rows]
    log.info("%s: removed %d of %d (%d poisoned kept) in %.1fs, then %s", name, int((~keep).sum()),
             len(keep), int((keep & poison).sum()), defense_s,
             f"retrained ({regime})" if retrain else "scored the run's model")
    return rows


def _mask(keep, exp, what: str) -> torch.Tensor:
    keep = torch.as_tensor(keep, dtype=torch.bool).cpu()
    if keep.shape != exp.train_set.poison.shape:
        raise ValueError(f"{what}: keep-mask has shape {tuple(keep.shape)}, the training set "
                         f"{len(exp.train_set.poison)} rows")
    return keep


@DEFENSES.register("nd")
def no_defense(exp, cfg) -> list[dict]:
    """ND: keep everything (the run's own model, reported in the sanitizer's terms)."""
    return run_sanitizer(exp, cfg, lambda e, c: (torch.ones(len(e.train_set.y), dtype=torch.bool), {}), retrain=False)


@DEFENSES.register("oracle")
def oracle(exp, cfg) -> list[dict]:
    """Oracle: train on the clean part only (reads the poison flags by definition)."""
    return run_sanitizer(exp, cfg, lambda e, c: (~e.train_set.poison, {}))
