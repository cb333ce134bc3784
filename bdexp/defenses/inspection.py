"""The inspector protocol (Neural Cleanse; ML-MMDR §6.2) — the evaluator side.

An inspector examines the frozen model with the clean reserve (every class: the defender does not
know the target) and returns an `InspectorOutput`. The evaluator then scores it against the
truth with the defense's own `score` hook (registered with it), e.g. whether the target class
was flagged.
"""
from __future__ import annotations

from pathlib import Path

from bdexp.defenses.contexts import InspectorContext, InspectorOutput, Kind, ModelView, Reserve, check_context, register_kind, sealed_call


def inspector_context(exp, name: str) -> InspectorContext:
    idx = exp.reserve_index
    reserve = Reserve(exp.data.x_test[idx], exp.data.y_test[idx].clone(), idx.numpy())
    run_dir = exp.info.get("run_dir")
    # a folder of its own: the run directory holds the run's config (.hydra/), which names the attack
    out_dir = None if run_dir is None else Path(run_dir) / name
    ctx = InspectorContext(seed=exp.seed, view=ModelView(exp.model, exp.device, int(exp.cfg.eval_batch_size)),
                           reserve=reserve, num_classes=exp.data.num_classes, out_dir=out_dir)
    check_context(ctx)
    return ctx


def run_inspector(exp, name: str, opts, inspect, meta: dict) -> list[dict]:
    ctx = inspector_context(exp, name)
    out = sealed_call(exp, name, inspect, ctx, opts)
    score = meta.get("score")
    return list(out.records) + (score(exp, opts, out) if score is not None else [])


def _probe(act):
    """An inspector that changes nothing (contexts.KindSpec.probe): finds nothing."""
    def inspect(ctx, opts):
        act("")
        return InspectorOutput([])

    return inspect


register_kind(Kind.inspector, run_inspector, _probe)
