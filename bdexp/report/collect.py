"""Gather every results.json under a directory into one long-format DataFrame."""
from __future__ import annotations

import json
import logging
from pathlib import Path

import pandas as pd

from bdexp.results import RESULTS_FILE

log = logging.getLogger(__name__)

# Run-level identity copied onto every metric row, so any table is a pivot of one frame.
RUN_COLUMNS = ("dataset", "model", "attack", "attack_mode", "train", "seed", "scale", "bdexp_version")


def find_results(root: Path) -> list[Path]:
    root = Path(root)
    if root.is_file():
        return [root]
    return sorted(root.rglob(RESULTS_FILE))


def collect(root: Path) -> pd.DataFrame:
    """One row per metric record, tagged with its run's identity and directory."""
    rows = []
    for path in find_results(root):
        try:
            payload = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as err:
            log.warning("skipping unreadable %s: %s", path, err)
            continue
        run = payload.get("run", {})
        ident = {k: run.get(k) for k in RUN_COLUMNS}
        ident["run_dir"] = str(path.parent)
        ident["status"] = payload.get("status", "complete")
        for rec in payload.get("metrics", []):
            rows.append({**ident, **rec})
    return pd.DataFrame(rows)
