"""Analyses (distances + ARO, class-wise patterns, overlap bound), selected by `analysis=[...]`."""
from __future__ import annotations

import logging

from bdexp.registry import Registry, import_submodules

log = logging.getLogger(__name__)

# name -> function(exp, cfg) -> list of long-format records
ANALYSES: Registry = Registry("analysis")


def run_analyses(exp, store=None) -> list[dict]:
    """Run each selected analysis; `store` as in defenses.run_defenses."""
    from bdexp.jobs import run_recorded

    steps = [(key, acfg.get("name", key), lambda key=key, acfg=acfg: [
        {**row, "analysis": row.get("analysis", key)} for row in ANALYSES.get(acfg.get("name", key))(exp, acfg)])
        for key, acfg in (exp.cfg.get("analysis") or {}).items()]
    return run_recorded("analysis", steps, store)


import_submodules(__name__, __path__)
