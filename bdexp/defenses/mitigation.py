"""The mitigation kind: post-training repair of a suspect model (docs/defenses.md, "Repair defenses").

A mitigation is `repair(MitigationContext, opts) -> Repair`. Its context holds what a defender with
a suspect model has: a *copy* of the trained model (the run's own model is checked to be byte-
identical afterwards, bdexp/defenses/repair.py), the defender's clean data with true labels, the
training tools of `Repairer` (loaders with the run's augmentation, fine-tuning, resumable epochs),
the run's optimiser schedule and a seeded generator. It never holds the poisoned training set, the
attack, the trigger or the backdoor test set; while it runs the run is sealed (Experiment.sealed).

The clean data (`clean_source`, recorded as the records `clean_n` and, when changed, the option):
- "train" (default): BackdoorBench's convention, `clean_ratio` (5 %) of the training set's size
  drawn from its *clean* rows, stratified by class and seeded (never a poisoned row: the evaluator
  picks them with the flags the defender never sees). The repaired model is scored on the test set,
  which the defender never saw.
- "reserve": the test-image reserve of the screening protocol (`screening.reserve_per_class` per
  class); the repaired and the undefended model are then both scored on the other test images.

Records (tagged `defense: <name>`): `ba` (C-Acc), `asr`, `tmr`, `ra`, `der`, `wall_s`, `clean_acc_undefended`,
`model_epochs`, `repair_cache`, `clean_n`, `ba_undefended`, `asr_undefended` and the defense's own.
"""
from __future__ import annotations

import copy
import logging
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch
from torch import nn

from bdexp.attacks.base import apportion
from bdexp.cache import data_fingerprint, key_of
from bdexp.defenses.contexts import Kind, check_context, register_kind, sealed_call
from bdexp.defenses.repair import Repair, Repairer, cached_repair, repair_identity, repairer_fields, score_repair
from bdexp.errors import ConfigError
from bdexp.evaluate import predict
from bdexp.options import Options, option
from bdexp.results import record

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class MitigationOptions(Options):
    """Keys every mitigation has (each conf/defense/<mitigation>.yaml repeats them)."""

    clean_source: Literal["train", "reserve"] = "train"  # the defender's clean data (module docstring)
    # BackdoorBench's default: 5 % of the training set, clean rows only ("ratio" in its defense configs)
    clean_ratio: float = option(0.05, lo=0, hi=1, lo_open=True)


@dataclass(frozen=True)
class MitigationContext(Repairer):
    """A mitigation's view: a copy of the suspect model (the defender's to change and return) and the
    defender's clean data (`x`, `y`: uint8 images, true labels) with the `Repairer` tools."""

    model: nn.Module  # a copy of the run's model, in eval mode
    model_name: str  # conf/model/<name>


def clean_data(exp, opts: MitigationOptions) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """(images, labels, the clean test rows the repaired model is scored on or None for all) of the
    defender's clean data (module docstring)."""
    if opts.clean_source == "reserve":
        idx = exp.reserve_index
        return exp.data.x_test[idx], exp.data.y_test[idx].clone(), exp.screen_index
    ts = exp.train_set
    # Rows the attack changed are not clean, whatever their label: poisoned, cross (changed per
    # batch) and Adap-* cover rows (a trigger with the true label).
    changed = ts.poison | ts.cross | (ts.cover if ts.cover is not None else torch.zeros_like(ts.poison))
    clean = np.flatnonzero((~changed).numpy())
    want = int(round(opts.clean_ratio * len(ts.y)))
    if want < 1 or len(clean) == 0:
        raise ConfigError(f"clean_ratio={opts.clean_ratio} of {len(ts.y)} training images leaves no clean image for "
                          "the defender; raise clean_ratio or use clean_source=reserve")
    want = min(want, len(clean))
    labels = ts.y.numpy()[clean]
    classes, counts = np.unique(labels, return_counts=True)
    quotas = apportion([want * c / len(clean) for c in counts])  # stratified: each class its share
    rng = exp.rng("mitigation/clean")
    picked = np.sort(np.concatenate([rng.choice(clean[labels == c], q, replace=False)
                                     for c, q in zip(classes, quotas) if q > 0]))
    rows = torch.as_tensor(picked, dtype=torch.long)
    return ts.x[rows], ts.y[rows].clone(), None


def run_mitigation(exp, name: str, opts: MitigationOptions, repair, meta: dict) -> list[dict]:
    """Repair a copy of the run's model with the defender's clean data (cached), then score it."""
    x, y, test_rows = clean_data(exp, opts)
    identity = repair_identity(exp, Kind.mitigation, name, opts, data_fingerprint(x, y))

    def produce() -> Repair:
        ctx = MitigationContext(**repairer_fields(exp, x, y, key_of(identity)),
                                model=copy.deepcopy(exp.model).eval(), model_name=str(exp.cfg.model.name))
        check_context(ctx)
        return sealed_call(exp, name, repair, ctx, opts)

    model, info, hit = cached_repair(exp, name, identity, produce)
    rows = score_repair(exp, name, model, info, hit, test_rows)
    fit = float((predict(exp.model, x, exp.device, int(exp.cfg.eval_batch_size)) == y).float().mean())
    warn_if_memorized(exp, name, opts, fit, next(r["value"] for r in rows if r["metric"] == "ba_undefended"))
    return [*rows, record("clean_n", float(len(y))), record("clean_acc_undefended", fit)]


# A suspect model this much more accurate on the defender's clean data than on unseen test images
# learnt those images by heart: they come from its own training set (clean_source=train).
MEMORIZED_GAP = 0.1


def warn_if_memorized(exp, name: str, opts: MitigationOptions, clean_acc: float, test_acc: float) -> bool:
    """True when the defender's clean data were memorized by the suspect model: a repair that learns
    from them then gets almost no gradient, and FT, NAD and FP leave the model as it is
    (docs/defenses.md, "Memorized clean data"). Warned once per run (`clean_acc_undefended` is
    recorded for every mitigation)."""
    if opts.clean_source != "train" or clean_acc - test_acc < MEMORIZED_GAP:
        return False
    if not exp.info.get("memorized_clean_data_warned"):
        exp.info["memorized_clean_data_warned"] = True
        log.warning("%s: the suspect model fits the defender's clean data (accuracy %.3f, %.3f on test images): "
                    "they are training rows it memorized, so repairs that learn from them get little gradient "
                    "(record clean_acc_undefended); clean_source=reserve gives the defender unseen images",
                    name, clean_acc, test_acc)
    return True


def _probe(act):
    """A mitigation that changes nothing (contexts.KindSpec.probe): returns the copy it was given."""
    def repair(ctx, opts):
        act("")
        return Repair(ctx.model)

    return repair


register_kind(Kind.mitigation, run_mitigation, _probe, MitigationOptions)
