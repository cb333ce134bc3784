"""Defenses (detectors, sanitizers, inspectors, mitigations, training-time defenses); one file per
defense, selected by `defense=[...]`.

A defense registers its defender function with its options and its kind:

    @DEFENSES.register("ac", options=ACOptions, kind=Kind.pool_detector)
    def detect_ac(features, reserve, opts, *, assumed_ratio, rng) -> DetectorOutput: ...

The kind's evaluator (registered by the kind's module: contexts.register_kind) builds what that defender has from the run
(bdexp/defenses/contexts.py), calls the defense with it while the run is sealed, and turns its
output into records. Adding a defense is its file plus its YAML (README, "Adding a method").
"""
from __future__ import annotations

import gc
import logging

from bdexp.registry import Registry, import_submodules

log = logging.getLogger(__name__)

# name -> defender function; meta: kind (contexts.KINDS), reads_ground_truth (the oracle only)
DEFENSES: Registry = Registry("defense")


def run_defense(exp, key: str, dcfg) -> list[dict]:
    """One selected defense: its options parsed from `dcfg`, run by its kind's evaluator."""
    name = str(dcfg.name)
    fn, meta = DEFENSES.get(name), DEFENSES.meta(name)
    opts = DEFENSES.options(name).parse(dcfg, f"defense.{key}")
    # Garbage in reference cycles (copies of the config Hydra made while composing, say) stays
    # findable through the garbage collector until its next pass: collect it before the defense
    # runs (Experiment.sealed leaves none behind itself).
    gc.collect()
    from bdexp.defenses.contexts import KINDS

    evaluator = KINDS.get(meta["kind"]).evaluator
    return [{**row, "defense": row.get("defense", key)} for row in evaluator(exp, name, opts, fn, meta)]


def run_defenses(exp, store=None) -> list[dict]:
    """Run each selected defense (cfg.defense is a mapping name -> its own keys). `store`
    (results.PartialRecords): skip the defenses it holds and record each one as it finishes."""
    from bdexp.jobs import run_recorded

    steps = []
    for key, dcfg in (exp.cfg.get("defense") or {}).items():
        if dcfg.get("name") is None:
            # Every defense YAML sets `name`; a node without one holds settings a preset gives a
            # defense (e.g. mlmmdr_*'s defense.ac.n_components) that this run did not select.
            log.warning("defense.%s is configured but not selected (defense=[...] lacks it); skipped", key)
            continue
        # the node is looked up when its turn comes: sealing a run (Experiment.sealed) replaces the
        # config's nodes by copies, so one held from before an earlier defense would be stale
        steps.append((key, dcfg.name, lambda key=key: run_defense(exp, key, exp.cfg.defense[key])))
    return run_recorded("defense", steps, store)


import_submodules(__name__, __path__)
