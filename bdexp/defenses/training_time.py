"""The training-time kind: a defender that trains the model itself on the poisoned training set as
given (images and given labels, never the poison flags), e.g. ABL (Li et al. 2021), and returns it
(docs/defenses.md, "Repair defenses").

A training-time defense is `train(TrainingContext, opts) -> Repair`; its `isolated` mask (the rows
it set apart as suspect, over the context's rows) is scored by the evaluator against the flags it
never sees: `isolation_precision`, `isolation_recall`, `n_isolated`. The model is scored like a
mitigation's against the run's own, undefended model (C-Acc, ASR, TMR, RA, DER; bdexp/defenses/
repair.py) and cached by the training data, the model config, the defense and its options and the
seed, not by the run's model: runs that differ only in how the attacker trained (train=standard vs
mlmmdr) share it. When the run's model was trained the attacker's way, its records carry
`threat_model_conflict` = 1 as the sanitizers' do (bdexp/defenses/sanitize.py).
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from omegaconf import OmegaConf
from torch import nn

from bdexp.cache import data_fingerprint, key_of
from bdexp.defenses.contexts import Kind, check_context, register_kind, sealed_call
from bdexp.defenses.repair import Repair, Repairer, cached_repair, repair_identity, repairer_fields, score_repair
from bdexp.defenses.sanitize import threat_model_conflict, unshuffle
from bdexp.models import build_for
from bdexp.options import NoOptions
from bdexp.results import record
from bdexp.seeding import derive_seed


@dataclass(frozen=True)
class TrainingContext(Repairer):
    """A training-time defender's view: the training set as given (`x`, `y`: images, given labels,
    in an order that does not give appended rows away), a factory of fresh models of the run's
    architecture (never the suspect weights) and the `Repairer` tools."""

    make_model: Callable[[str], nn.Module]  # tag -> a freshly initialized model, seeded by the run seed and tag
    model_name: str


ORDER_TAG = "training_time/order"


def run_training_time(exp, name: str, opts, train, meta: dict) -> list[dict]:
    """Let the defense train its model on the poisoned set (cached), then score it and its isolated set.

    Rows an attack appended sit last, so their position would give them away: then the context
    holds the rows in an order a defender cannot recompute (as the sanitizers' do), kept with the
    run (exp.info, sealed while the defense runs), never in this frame."""
    x, y = _defender_rows(exp)
    identity = repair_identity(exp, Kind.training_time, name, opts, data_fingerprint(x, y), suspect=False)
    model_cfg = OmegaConf.create(OmegaConf.to_container(exp.cfg.model, resolve=True))
    num_classes, device, seed = exp.data.num_classes, exp.device, exp.seed

    def make_model(tag: str) -> nn.Module:
        torch.manual_seed(derive_seed(seed, f"{name}/{tag}"))
        return build_for(model_cfg, x, num_classes).to(device)

    def produce() -> Repair:
        ctx = TrainingContext(**repairer_fields(exp, x, y, key_of(identity)), make_model=make_model,
                              model_name=str(exp.cfg.model.name))
        check_context(ctx)
        return sealed_call(exp, name, train, ctx, opts)

    model, info, hit = cached_repair(exp, name, identity, produce)
    rows = score_repair(exp, name, model, info, hit)
    if info.get("isolated") is not None:
        rows += isolation_records(exp, name, info["isolated"])
    if threat_model_conflict(exp) is not None:
        rows.append(record("threat_model_conflict", 1.0))
    return rows


def _defender_rows(exp) -> tuple[torch.Tensor, torch.Tensor]:
    """The training images and given labels in the context's order (exp.info[ORDER_TAG]: None = as stored)."""
    ts = exp.train_set
    order = None
    if len(ts.y) > len(exp.data.y_train):
        order = torch.from_numpy(exp.truth_rng(ORDER_TAG, ts.poison).permutation(len(ts.y)))
    exp.info[ORDER_TAG] = order
    return (ts.x, ts.y) if order is None else (ts.x[order], ts.y[order])


def isolation_records(exp, name: str, isolated) -> list[dict]:
    """Precision and recall of the rows a defense isolated (a mask over its context's rows)."""
    isolated = unshuffle(isolated, exp.info.get(ORDER_TAG))
    poison = exp.train_set.poison
    if isolated.shape != poison.shape:
        raise ValueError(f"{name}: isolated mask has shape {tuple(isolated.shape)}, the training set {len(poison)} rows")
    caught = float((isolated & poison).sum())
    return [record("n_isolated", float(isolated.sum())),
            record("isolation_precision", caught / float(isolated.sum()) if isolated.any() else float("nan")),
            record("isolation_recall", caught / float(poison.sum()) if poison.any() else float("nan"))]


def _probe(act):
    """A training-time defense that trains nothing (contexts.KindSpec.probe): a fresh model."""
    def train(ctx, opts):
        act("")
        return Repair(ctx.make_model("probe"), isolated=torch.zeros(len(ctx.y), dtype=torch.bool))

    return train


register_kind(Kind.training_time, run_training_time, _probe, NoOptions)
