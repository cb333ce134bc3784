"""Defenses (detectors, sanitizers, inspectors); one file per defense, selected by `defense=[...]`."""
from __future__ import annotations

import logging

from bdexp.registry import Registry, import_submodules

log = logging.getLogger(__name__)

# name -> function(exp, cfg) -> list of long-format records
DEFENSES: Registry = Registry("defense")


def run_defenses(exp) -> list[dict]:
    """Run each selected defense (cfg.defense is a mapping name -> its own keys)."""
    rows: list[dict] = []
    for key, dcfg in (exp.cfg.get("defense") or {}).items():
        if dcfg.get("name") is None:
            # Every defense YAML sets `name`; a node without one holds settings a preset gives a
            # defense (e.g. mlmmdr_*'s defense.ac.n_components) that this run did not select.
            log.warning("defense.%s is configured but not selected (defense=[...] lacks it); skipped", key)
            continue
        name = dcfg.name
        log.info("defense %s", name)
        for row in DEFENSES.get(name)(exp, dcfg):
            rows.append({**row, "defense": row.get("defense", key)})
    return rows


import_submodules(__name__, __path__)
