"""Analyses (distances + ARO, class-wise patterns, overlap bound), selected by `analysis=[...]`."""
from __future__ import annotations

import logging

from bdexp.registry import Registry, import_submodules

log = logging.getLogger(__name__)

# name -> function(exp, opts) -> list of long-format records; registered with its Options
ANALYSES: Registry = Registry("analysis")


def run_analysis(exp, key: str, acfg) -> list[dict]:
    """One selected analysis: its options parsed from `acfg` (as defenses.run_defense does)."""
    name = str(acfg.name)
    opts = ANALYSES.options(name).parse(acfg, f"analysis.{key}")
    return [{**row, "analysis": row.get("analysis", key)} for row in ANALYSES.get(name)(exp, opts)]


def run_analyses(exp, store=None) -> list[dict]:
    """Run each selected analysis; `store` as in defenses.run_defenses."""
    from bdexp.jobs import run_recorded

    steps = []
    for key, acfg in (exp.cfg.get("analysis") or {}).items():
        if acfg.get("name") is None:  # settings a preset gives an analysis this run did not select
            log.warning("analysis.%s is configured but not selected (analysis=[...] lacks it); skipped", key)
            continue
        steps.append((key, str(acfg.name), lambda key=key, acfg=acfg: run_analysis(exp, key, acfg)))
    return run_recorded("analysis", steps, store)


import_submodules(__name__, __path__)
