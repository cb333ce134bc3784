"""Gather every results.json under a directory into one long-format DataFrame."""
from __future__ import annotations

import json
import logging
from pathlib import Path

import pandas as pd

from bdexp.results import HASH_EXCLUDED, RESULTS_FILE, UNREADABLE, read_status

log = logging.getLogger(__name__)

# Run-level identity copied onto every metric row, so any table is a pivot of one frame.
RUN_COLUMNS = ("dataset", "model", "attack", "attack_mode", "source", "target", "poison_rate", "scenario",
               "train", "lambda", "kernel", "seed", "scale", "bdexp_version")
# Config keys that never tell two cases apart: the seed (tables aggregate over it) and the keys
# that only change how a run looks or where its files go.
NOT_A_CASE = ("seed", "hydra", "eval_batch_size", *HASH_EXCLUDED)


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


def flatten_config(node, prefix: str = "") -> dict[str, object]:
    """Dotted keys of a nested config ("attack.mark"); lists become JSON text and null "null", so
    the values of two runs compare as plain scalars."""
    out: dict[str, object] = {}
    for key, value in node.items():
        name = f"{prefix}{key}"
        if not prefix and key in NOT_A_CASE:
            continue
        if isinstance(value, dict):
            out.update(flatten_config(value, f"{name}."))
        elif isinstance(value, (list, tuple)):
            out[name] = json.dumps(value, sort_keys=True, default=str)
        else:
            out[name] = "null" if value is None else value
    return out


def swept_keys(configs: list[dict[str, object]]) -> list[str]:
    """Dotted config keys with two or more different values among `configs`, in config order. A key
    some runs lack (e.g. a defense not selected there) is compared only among the runs that have it."""
    seen: dict[str, set] = {}
    for flat in configs:
        for key, value in flat.items():
            seen.setdefault(key, set()).add(json.dumps(value, default=str))
    return [key for key, values in seen.items() if len(values) > 1]


def collect(root: Path) -> pd.DataFrame:
    """One row per metric record, tagged with its run's identity and directory, plus one column per
    config key the complete runs disagree on (dotted name, e.g. `attack.mark`; see tables.case_keys)."""
    runs = []
    for path in find_results(root):
        try:
            payload = json.loads(path.read_text())
            if not isinstance(payload, dict):
                raise ValueError(f"a JSON {type(payload).__name__}, not a results object")
        except UNREADABLE as err:  # truncated, random bytes, not JSON (results.UNREADABLE)
            log.warning("skipping unreadable %s: %s", path, err)
            continue
        runs.append((path, payload))
    configs = {str(path.parent): flatten_config(payload.get("run", {}).get("config") or {})
               for path, payload in runs if payload.get("status", "complete") == "complete" and payload.get("metrics")}
    swept = swept_keys(list(configs.values()))
    rows = []
    for path, payload in runs:
        run = payload.get("run", {})
        ident = {k: run.get(k) for k in RUN_COLUMNS}
        ident["regime"] = regime_label(run.get("train"), run.get("lambda"))
        ident["run_dir"] = str(path.parent)
        ident["status"] = payload.get("status", "complete")
        if ident["status"] == "interrupted":  # part of a run: its re-run (maybe another dir) holds all
            log.warning("skipping interrupted run %s (re-run its command to complete it)", path.parent)
            continue
        flat = configs.get(ident["run_dir"], {})
        ident.update({key: flat[key] for key in swept if key in flat})
        for rec in payload.get("metrics", []):
            rows.append({**ident, **rec})
    return pd.DataFrame(rows)
