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
training: WaNet's noise mode, BppAttack's negatives, IAD's generator) every sanitizer record set gets `threat_model_conflict` = 1, so
tables can print "n/a" instead of a number, and the run logs one warning.
"""
from __future__ import annotations

import hashlib
import logging
import time
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf

from bdexp.defenses import DEFENSES
from bdexp.defenses.contexts import Kind, ModelView, OracleContext, SanitizerContext, check_context, register_kind, sealed_call
from bdexp.defenses.ispl_core import TensorTrainer
from bdexp.evaluate import score_model
from bdexp.options import NoOptions, Options
from bdexp.results import record
from bdexp.training.base import REGIMES
from bdexp.training.defender import defender_train_cfg
from bdexp.training.fit import FitRequest, fit

log = logging.getLogger(__name__)

# (SanitizerContext, opts) -> (keep: bool tensor over the training set, info). info may hold
# "model_epochs" (the defense's training cost), "stages" ({stage name: bool keep-mask} of
# intermediate sets, e.g. ISPL's set after boosting: the evaluator scores each as fp_<stage> and
# fn_<stage>) and "records" (extra records, e.g. the removal fraction SS used).
KeepFn = Callable[..., tuple[torch.Tensor, dict]]


@dataclass(frozen=True)
class SanitizerOptions(Options):
    """Keys every retraining sanitizer has (conf/defense/oracle.yaml)."""

    retrain_regime: str = "standard"  # the defender's training regime (training/defender.py)


def defender_training(exp, name: str, opts) -> DictConfig:
    """The train config of the defender's models: `retrain_regime` with the run's schedule."""
    return defender_train_cfg(exp.cfg.train, opts.retrain_regime, f"defense.{name}.retrain_regime")


def _detached(node) -> DictConfig:
    """A copy of a config node with no parent: nothing in it leads back to the run's config."""
    return OmegaConf.create(OmegaConf.to_container(node, resolve=True))


ORDER_KEY = "sanitizer/order"  # exp.info: the row order of the sanitizer's context (sanitizer_context)


def sanitizer_context(exp, name: str, opts, meta: dict) -> SanitizerContext:
    """What the sanitizer has (ISPL §3.1): the training images and given labels, the model trained on
    them, a trainer with its own regime, the run's schedule length; the oracle also the flags.

    Rows an attack appended (`inject: append`) sit after the original ones, so their position
    would give them away: then the context holds the rows in a random order a defender cannot
    recompute (Experiment.truth_rng), kept with the run (exp.info[ORDER_KEY], sealed while the
    sanitizer runs), and its keep-masks are mapped back (`unshuffle`). None there: as stored."""
    ts, cfg = exp.train_set, exp.cfg
    view = ModelView(exp.model, exp.device, int(cfg.eval_batch_size))
    order = None
    if len(ts.y) > len(exp.data.y_train):
        order = torch.from_numpy(exp.truth_rng("sanitizer/order", ts.poison).permutation(len(ts.y)))
    exp.info[ORDER_KEY] = order
    x, y = (ts.x, ts.y) if order is None else (ts.x[order], ts.y[order])
    model_cfg, device = _detached(cfg.model), exp.device
    crop_padding, flip = int(cfg.dataset.augment.crop_padding), bool(cfg.dataset.augment.flip)
    train_cfg = _detached(defender_training(exp, name, opts)) if meta.get("retrain", True) else None

    def make_trainer() -> TensorTrainer:
        """Trains the defender's models: the run's model, optimiser settings and augmentation under
        the defense's `retrain_regime` (never the run's regime: it may be the attacker's)."""
        return TensorTrainer(x, y, model_cfg, train_cfg, device, crop_padding=crop_padding, flip=flip,
                             eval_batch_size=view.eval_batch_size, regime=REGIMES.get(str(train_cfg.name)))

    common = dict(seed=exp.seed, x=x, y=y, num_classes=exp.data.num_classes, view=view,
                  model_name=str(cfg.model.name), make_trainer=make_trainer, train_epochs=int(cfg.train.epochs),
                  reference_epochs=float(cfg.sanitizer_reference_epochs))
    if meta.get("reads_ground_truth"):
        poison = ts.poison if order is None else ts.poison[order]
        ctx = OracleContext(**common, poison=poison.clone())
    else:
        ctx = SanitizerContext(**common)
    check_context(ctx)
    return ctx


def unshuffle(mask, order: torch.Tensor | None) -> torch.Tensor:
    """A keep-mask over the context's rows as a mask over the stored training set."""
    mask = torch.as_tensor(mask, dtype=torch.bool).cpu()
    if order is None or mask.shape != order.shape:
        return mask  # (a wrong shape is reported by _mask)
    out = torch.empty_like(mask)
    out[order] = mask
    return out


def threat_model_conflict(exp) -> str | None:
    """Why the run's model assumes an attacker who trains it (module docstring), or None."""
    train = str(exp.cfg.train.name)
    if REGIMES.get(train).reads_poison_flags:
        return (f"train={train} is the attacker's training (its loss reads the poison flags; ML-MMDR §3.1: the "
                "attacker controls the training procedure)")
    if exp.attack.co_trained:
        return (f"attack={exp.attack.name} trains its trigger generator with the model and poisons every batch; the "
                "poisoned training set is materialized from its final state: the attacker trains the model")
    if bool(exp.train_set.cross.any()):
        return ("the attack changes rows while the model trains (WaNet noise mode, BppAttack's negatives): "
                "the attacker trains the model")
    return None


def _warn_conflict_once(exp, why: str) -> None:
    if not exp.info.get("threat_model_conflict_warned"):
        exp.info["threat_model_conflict_warned"] = True
        log.warning("threat models do not compose: %s, while training-set sanitizers assume the defender trains "
                    "on the data it is given (ISPL §3.1). Sanitizer results of this run carry "
                    "threat_model_conflict=1", why)


def run_sanitizer(exp, name: str, opts, keep_fn: KeepFn, meta: dict) -> list[dict]:
    """Sanitize, retrain on the kept set with the defender's regime (cached by the mask's hash)
    and score the result. `meta["retrain"] = False` (ND only) scores the run's own model."""
    retrain = meta.get("retrain", True)
    ctx = sanitizer_context(exp, name, opts, meta)
    train_cfg = defender_training(exp, name, opts) if retrain else None
    start = time.perf_counter()
    keep, info = sealed_call(exp, name, keep_fn, ctx, opts)
    order = exp.info.pop(ORDER_KEY)
    keep = _mask(unshuffle(keep, order), exp, name)
    stages = {stage: _mask(unshuffle(mask, order), exp, f"{name} ({stage})")
              for stage, mask in (info.pop("stages", None) or {}).items()}
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
        request = FitRequest(train_cfg=train_cfg, keep=None if extra is None else kept, key_extra=extra,
                             describe=f"{name}: retrain", defender=True)
        model, fit_info = fit(exp.cfg, exp.data, exp.attack, exp.train_set, exp.device, exp.cache, request)
        from_cache = fit_info["cache"] == "hit"
    # ISPL's names: C is the clean accuracy (BA), A the TMR (ISPL eq. 7)
    scored = {r["metric"]: r["value"] for r in score_model(model, exp.data.x_test, exp.data.y_test, exp.backdoor_test,
                                                           exp.device, int(exp.cfg.eval_batch_size), ("ba", "tmr", "asr"))}
    poison = exp.train_set.poison
    rows = [
        record("c", scored["ba"]),
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
        *info.get("records", []),
    ]
    if "tmr" in scored:
        rows.append(record("a", scored["tmr"]))
        rows.append(record("asr", scored["asr"]))
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


@DEFENSES.register("nd", options=NoOptions, kind=Kind.sanitizer, retrain=False)
def no_defense(ctx: SanitizerContext, opts) -> tuple[torch.Tensor, dict]:
    """ND: keep everything (the run's own model, reported in the sanitizer's terms)."""
    return torch.ones(len(ctx.y), dtype=torch.bool), {}


@DEFENSES.register("oracle", options=SanitizerOptions, kind=Kind.sanitizer, reads_ground_truth=True)
def oracle(ctx: OracleContext, opts) -> tuple[torch.Tensor, dict]:
    """Oracle: train on the clean part only. An upper bound, not a defender: it is the one defense
    handed the poison flags (`reads_ground_truth`)."""
    return ~ctx.poison, {}


def _probe(act):
    """A sanitizer that changes nothing (contexts.KindSpec.probe): keeps every row."""
    def keep(ctx, opts):
        act("")
        return torch.ones(len(ctx.y), dtype=torch.bool), {}

    return keep


register_kind(Kind.sanitizer, run_sanitizer, _probe, SanitizerOptions)
