"""Defenses (detectors, sanitizers, inspectors); one file per defense, selected by `defense=[...]`."""
from __future__ import annotations

import logging

from bdexp.registry import Registry, import_submodules

log = logging.getLogger(__name__)

# name -> function(exp, cfg) -> list of long-format records
DEFENSES: Registry = Registry("defense")


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
        steps.append((key, dcfg.name, lambda key=key, dcfg=dcfg: [
            {**row, "defense": row.get("defense", key)} for row in DEFENSES.get(dcfg.name)(exp, dcfg)]))
    return run_recorded("defense", steps, store)


import_submodules(__name__, __path__)
