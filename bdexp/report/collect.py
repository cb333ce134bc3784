"""Gather every results.json under a directory into one long-format DataFrame."""
from __future__ import annotations

import json
import logging
from pathlib import Path

import pandas as pd

from bdexp.results import RESULTS_FILE, read_status

log = logging.getLogger(__name__)

# Run-level identity copied onto every metric row, so any table is a pivot of one frame.
RUN_COLUMNS = ("dataset", "model", "attack", "attack_mode", "source", "target", "poison_rate", "scenario",
               "train", "lambda", "kernel", "seed", "scale", "bdexp_version")


def regime_label(train: str | None, lam: float | None) -> str | None:
    """ML-MMDR's names: RBT (λ = 0, the plain two-term loss), ML, SL; other regimes keep theirs."""
    if train in ("mlmmdr", "slmmdr"):
        return "RBT" if lam is not None and float(lam) == 0.0 else ("ML" if train == "mlmmdr" else "SL")
    return train


def find_results(root: Path) -> list[Path]:
    root = Path(root)
    if root.is_file():
        return [root]
    return sorted(root.rglob(RESULTS_FILE))


def run_statuses(paths: list[Path]) -> dict[str, list[str]]:
    """Run directories grouped by their results.json status (complete, failed, unreadable)."""
    out: dict[str, list[str]] = {}
    for path in paths:
        out.setdefault(read_status(path)[0], []).append(str(Path(path).parent))
    return out


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
        ident["regime"] = regime_label(run.get("train"), run.get("lambda"))
        ident["run_dir"] = str(path.parent)
        ident["status"] = payload.get("status", "complete")
        for rec in payload.get("metrics", []):
            rows.append({**ident, **rec})
    return pd.DataFrame(rows)
