"""The sanitizer protocol (DESIGN step 8, ISPL §4): a defense returns a keep-mask over the poisoned
training set; the pipeline retrains a fresh model on the kept rows and the evaluator reports
C (clean accuracy), A (TMR, ISPL eq. 7), FP (clean samples removed), FN (poisoned samples kept)
and the defense's cost. Baselines that need no model live here: `nd` (no defense) and `oracle`
(train on the clean part only — it reads the poison flags, as an oracle must).
"""
from __future__ import annotations

import hashlib
import logging
import time
from typing import Callable

import numpy as np
import torch

from bdexp import metrics
from bdexp.defenses import DEFENSES
from bdexp.evaluate import predict
from bdexp.results import record
from bdexp.training.fit import fit

log = logging.getLogger(__name__)

# (exp, cfg) -> (keep: bool tensor over the training set, info: {"model_epochs": ..., ...})
KeepFn = Callable[..., tuple[torch.Tensor, dict]]


def run_sanitizer(exp, dcfg, keep_fn: KeepFn) -> list[dict]:
    """Sanitize, retrain on the kept set (cached by the mask's hash) and score the result."""
    name = dcfg.get("name", "sanitizer")
    start = time.perf_counter()
    keep, info = keep_fn(exp, dcfg)
    keep = torch.as_tensor(keep, dtype=torch.bool).cpu()
    if keep.shape != exp.train_set.poison.shape:
        raise ValueError(f"{name}: keep-mask has shape {tuple(keep.shape)}, the training set {len(keep)} rows")
    defense_s = time.perf_counter() - start
    kept = keep.nonzero().flatten()
    if keep.all():  # nothing removed: the run's own model is the answer
        extra = None
    else:
        extra = {"keep": hashlib.sha256(np.packbits(keep.numpy()).tobytes()).hexdigest()[:16]}
    model, fit_info = fit(exp.cfg, exp.data, exp.attack, exp.train_set, exp.device, exp.cache,
                          keep=None if extra is None else kept, key_extra=extra, describe=f"{name}: retrain")
    bs = int(exp.cfg.eval_batch_size)
    pred_clean = predict(model, exp.data.x_test, exp.device, bs)
    poison = exp.train_set.poison
    rows = [
        record("c", metrics.accuracy(pred_clean, exp.data.y_test)),
        record("fp", float((~keep & ~poison).sum())),  # clean samples removed
        record("fn", float((keep & poison).sum())),  # poisoned samples kept
        record("n_removed", float((~keep).sum())),
        record("n_poison", float(poison.sum())),
        record("defense_wall_s", defense_s),
        record("model_epochs", float(info.get("model_epochs", 0))),
        record("retrain_cache", 1.0 if fit_info["cache"] == "hit" else 0.0),
    ]
    bd = exp.backdoor_test
    if len(bd.y_target):
        pred_bd = predict(model, bd.x, exp.device, bs)
        rows.append(record("a", metrics.targeted_misclassification_rate(pred_clean[bd.index], bd.y_true,
                                                                         pred_bd, bd.y_target)))
        rows.append(record("asr", metrics.attack_success_rate(pred_bd, bd.y_target)))
    log.info("%s: removed %d of %d (%d poisoned kept) in %.1fs, then retrained", name, int((~keep).sum()),
             len(keep), int((keep & poison).sum()), defense_s)
    return rows


@DEFENSES.register("nd")
def no_defense(exp, cfg) -> list[dict]:
    """ND: keep everything (the run's own model, reported in the sanitizer's terms)."""
    return run_sanitizer(exp, cfg, lambda e, c: (torch.ones_like(e.train_set.poison), {}))


@DEFENSES.register("oracle")
def oracle(exp, cfg) -> list[dict]:
    """Oracle: train on the clean part only (reads the poison flags by definition)."""
    return run_sanitizer(exp, cfg, lambda e, c: (~e.train_set.poison, {}))
