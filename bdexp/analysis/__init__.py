"""Analyses (distances + ARO, class-wise patterns, overlap bound), selected by `analysis=[...]`."""
from __future__ import annotations

import logging

from bdexp.registry import Registry, import_submodules

log = logging.getLogger(__name__)

# name -> function(exp, cfg) -> list of long-format records
ANALYSES: Registry = Registry("analysis")


def run_analyses(exp) -> list[dict]:
    rows: list[dict] = []
    for key, acfg in (exp.cfg.get("analysis") or {}).items():
        name = acfg.get("name", key)
        log.info("analysis %s", name)
        for row in ANALYSES.get(name)(exp, acfg):
            rows.append({**row, "analysis": row.get("analysis", key)})
    return rows


import_submodules(__name__, __path__)
