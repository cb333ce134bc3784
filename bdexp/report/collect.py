"""Gather every results.json under a directory into one long-format DataFrame."""
from __future__ import annotations

import json
import logging
from pathlib import Path

import pandas as pd
from omegaconf import OmegaConf

from bdexp.errors import BdexpError
from bdexp.results import (CASE_KEYS, HASH_EXCLUDED, IDENTITY_GROUPS, RESULTS_FILE, UNREADABLE, declared_defaults,
                           results_problem, run_identity)

log = logging.getLogger(__name__)

# Config keys that never tell two cases apart: the seed (tables aggregate over it) and the keys
# that only change how a run looks or where its files go.
NOT_A_CASE = ("seed", "hydra", "eval_batch_size", *HASH_EXCLUDED)
# Display names a paper's module gives a regime's own name (bdexp/report/mmdr.py: ML-MMDR's RBT,
# ML, SL); other regimes keep theirs.
REGIME_LABELS: dict[str, str] = {}


def regime_label(regime: str | None) -> str | None:
    return REGIME_LABELS.get(regime, regime) if regime is not None else None


def config_cell(value) -> object:
    """A config or identity value as a frame cell: lists and mappings as JSON text, null "null"
    (so the values of two runs compare as plain scalars)."""
    if isinstance(value, (list, tuple, dict)):
        return json.dumps(value, sort_keys=True, default=str)
    return "null" if value is None else value


def _scalar(value) -> bool:
    return value is None or isinstance(value, (str, int, float, bool))


def run_tags(run: dict) -> tuple[dict, list[str]]:
    """The columns a record's run object gives each of its metric rows (its scalar entries, and its
    identity; results.run_identity) and the keys that make its case. A record without
    `case_keys` (an older bdexp, or written by hand) takes its identity from its config where it
    has one, else counts every scalar entry but the seed and version as its case."""
    tags = {k: v for k, v in run.items() if _scalar(v)}
    keys = run.get(CASE_KEYS)
    if not isinstance(keys, list) and isinstance(run.get("config"), dict):
        try:
            ident = run_identity(OmegaConf.create(run["config"]))
        except Exception:  # noqa: BLE001 - a config this bdexp cannot read: the record's own tags
            ident = {}
        keys = ident.get(CASE_KEYS)
        tags = {**{k: v for k, v in ident.items() if v is not None}, **tags}
    if not isinstance(keys, list):
        keys = [k for k in tags if k not in ("seed", "bdexp_version")]
    if "regime" not in keys:  # the regime's name before the selected one (tables.case_keys)
        keys.insert(keys.index("train") if "train" in keys else len(keys), "regime")
    tags.update({k: config_cell(run[k]) for k in keys if k in run and not _scalar(run[k])})
    tags["regime"] = regime_label(tags.get("regime") or tags.get("train"))
    keys = [k for k in keys if k in tags]
    return {k: (config_cell(v) if "." in k else v) for k, v in tags.items()}, keys


def option_column(df: pd.DataFrame, group: str, key: str) -> pd.Series:
    """Option `key` of each row's `group` method (column `<group>.<key>` where the run's identity
    holds it, i.e. it differs from the default), else that method's declared default
    (results.declared_defaults); NaN where the method has no such option."""
    col = f"{group}.{key}"
    have = df[col] if col in df else pd.Series(None, index=df.index, dtype=object)
    if group not in df or not have.isna().any():
        return have
    defaults = {n: declared_defaults(group, n) for n in df[group].dropna().unique()}
    fill = df[group].map(lambda n: config_cell(defaults[n][key]) if key in defaults.get(n, {}) else None)
    return have.astype(object).where(have.notna(), fill).infer_objects()


def _load_layouts() -> None:
    """Import every module of bdexp/report, so their REGIME_LABELS are in place."""
    import bdexp.report as package
    from bdexp.registry import import_submodules

    import_submodules(package.__name__, package.__path__)


def find_results(root: Path) -> list[Path]:
    root = Path(root)
    if root.is_file():
        return [root]
    return sorted(root.rglob(RESULTS_FILE))


class ResultsFileError(BdexpError, ValueError):
    """A file that is not a usable bdexp results.json; the message names it and says why."""


# The status run_statuses gives a results.json that read_run cannot use.
UNREADABLE_STATUS = "unreadable"


def read_run(path: Path) -> tuple[dict, str | None]:
    """(payload, None) for a usable results.json; ({}, why) for one that cannot be read as JSON, is
    not shaped as bdexp writes it, or was edited after its run (results.results_problem)."""
    try:
        payload = json.loads(Path(path).read_text())
    except UNREADABLE as err:  # truncated, random bytes, not JSON, a directory (results.UNREADABLE)
        return {}, f"not readable as JSON ({err})"
    problem = results_problem(payload)
    return (payload, None) if problem is None else ({}, problem)


def run_statuses(paths: list[Path]) -> dict[str, list[str]]:
    """Run directories grouped by their results.json status (complete, failed, interrupted, ...);
    files read_run cannot use are listed, by file, under UNREADABLE_STATUS."""
    out: dict[str, list[str]] = {}
    for path in paths:
        payload, problem = read_run(path)
        if problem is not None:
            out.setdefault(UNREADABLE_STATUS, []).append(str(path))
        else:
            out.setdefault(payload.get("status", "complete"), []).append(str(Path(path).parent))
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
        else:
            out[name] = config_cell(value)
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
    config key the complete runs disagree on (dotted name, e.g. `attack.mark`; see tables.case_keys).
    Column CASE_KEYS holds each row's case keys (the identity keys, then the swept keys); an
    attack or train option a run left at its default reads that default (option_column). A
    results.json that cannot be used (read_run: unreadable, or not shaped as bdexp writes it) is
    skipped with a warning naming it and why, as is an interrupted run."""
    _load_layouts()
    runs = []
    for path in find_results(root):
        payload, problem = read_run(path)
        if problem is not None:
            log.warning("skipping %s: %s", path, problem)
            continue
        runs.append((path, payload))
    configs = {str(path.parent): flatten_config(payload["run"].get("config") or {})
               for path, payload in runs if payload.get("status", "complete") == "complete" and payload["metrics"]}
    swept = swept_keys(list(configs.values()))
    rows = []
    for path, payload in runs:
        ident, keys = run_tags(payload["run"])
        ident["run_dir"] = str(path.parent)
        ident["status"] = payload.get("status", "complete")
        if ident["status"] == "interrupted":  # part of a run: its re-run (maybe another dir) holds all
            log.warning("skipping interrupted run %s (re-run its command to complete it)", path.parent)
            continue
        flat = configs.get(ident["run_dir"], {})
        ident.update({key: flat[key] for key in swept if key in flat})
        ident[CASE_KEYS] = tuple(dict.fromkeys([*keys, *(key for key in swept if key in flat)]))
        own = {key: ident[key] for key in ("run_dir", "status", CASE_KEYS)}
        for rec in payload["metrics"]:  # a record's tags never replace the run's directory, status or case
            row = {**ident, **{k: v if _scalar(v) else config_cell(v) for k, v in rec.items()}}
            row.update(own)
            rows.append(row)
    frame = pd.DataFrame(rows)
    found = frame[CASE_KEYS].drop_duplicates() if CASE_KEYS in frame else []
    for col in dict.fromkeys(k for keys in found for k in keys):
        group, _, key = col.partition(".")
        if group in IDENTITY_GROUPS and key:
            frame[col] = option_column(frame, group, key)
    return frame
