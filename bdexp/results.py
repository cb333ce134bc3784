"""Long-format result records and the run's results.json (a `run` object and a list of `metrics`)."""
from __future__ import annotations

import json
import math
import os
import shutil
from pathlib import Path
from typing import Any

import bdexp
from bdexp.atomic import atomic_write_text

RESULTS_FILE = "results.json"
# Top-level config keys that change how a run looks or where files go, not what it computes: the
# config hash (jobs.py) leaves them out, and report tables never split rows on them.
HASH_EXCLUDED = ("progress", "cache", "device", "threads", "checkpoint_every", "objective")


def record(metric: str, value: float, **tags: Any) -> dict:
    """One long-format row: {"metric": "f1", "value": 0.93, "defense": "ac", "level": "s2", ...}.
    Tags with value None are dropped so pivots stay clean."""
    v = float(value)
    row = {"metric": metric, "value": v if math.isfinite(v) else None}
    row.update({k: t for k, t in tags.items() if t is not None})
    return row


def write_results(run_dir: Path, run: dict, metrics: list[dict], status: str = "complete") -> Path:
    path = Path(run_dir) / RESULTS_FILE
    payload = {"status": status, "run": run, "metrics": metrics}
    atomic_write_text(path, json.dumps(payload, indent=1, default=str))
    return path


def read_results(path: Path) -> dict:
    return json.loads(Path(path).read_text())


# What reading a results.json may raise when it is truncated, random bytes or not JSON
# (JSONDecodeError and UnicodeDecodeError are ValueErrors).
UNREADABLE = (OSError, ValueError)


def read_status(path: Path) -> tuple[str, dict]:
    """(status, payload) of a results.json: "complete", "failed", "interrupted", ... or
    "unreadable" (payload {}) for a missing, truncated or corrupt file."""
    try:
        payload = read_results(path)
    except UNREADABLE:
        return "unreadable", {}
    if not isinstance(payload, dict) or not isinstance(payload.get("run", {}), dict):
        return "unreadable", {}
    return payload.get("status", "complete"), payload


class PartialRecords:
    """The records of every defense and analysis a run has finished, written atomically as each
    one finishes, so a re-run of an interrupted (or failed) run reads them back instead of
    recomputing them (issue 13: "a 3-hour run killed in its last defense loses minutes").

    One JSON file per config hash: `<cache.dir>/partial/<hash>.json` when the cache is on (a
    re-run gets a new timestamped run directory), else `<run dir>/partial.json`. It also holds the
    key of the model the records were computed on: records of another model (e.g. the data
    changed under the same config) are ignored. Files a step wrote into its run directory (NC's
    mask grid, pattern figures) are named with it and copied into the re-run's directory. The
    pipeline removes the file once results.json is complete."""

    def __init__(self, path: Path, config_hash: str, run_dir: Path | None = None):
        self.path, self.config_hash, self.run_dir = Path(path), config_hash, run_dir
        self.model_key: str | None = None
        self.steps: dict[str, list[dict]] = {}
        self.files: dict[str, dict] = {}

    @classmethod
    def for_run(cls, cfg, run_dir: Path, config_hash: str) -> "PartialRecords":
        if cfg.cache.enabled:
            path = Path(os.path.expanduser(str(cfg.cache.dir))) / "partial" / f"{config_hash}.json"
        else:
            path = Path(run_dir) / "partial.json"
        return cls(path, config_hash, Path(run_dir))

    def bind(self, model_key: str) -> int:
        """Read the records stored for this config and model; returns how many steps there are."""
        self.model_key = model_key
        try:
            stored = json.loads(self.path.read_text())
        except UNREADABLE:  # none yet, or a torn/foreign file: recompute; rewritten on the first put
            stored = {}
        ok = (isinstance(stored, dict) and stored.get("config_hash") == self.config_hash
              and stored.get("model_key") == model_key and isinstance(stored.get("steps"), dict))
        self.steps = dict(stored["steps"]) if ok else {}
        self.files = dict(stored.get("files") or {}) if ok else {}
        return len(self.steps)

    def get(self, step: str) -> list[dict] | None:
        """The step's records, or None; its files are copied into this run's directory."""
        rows = self.steps.get(step)
        made = self.files.get(step) or {}
        if rows is not None and self.run_dir is not None and made.get("dir") != str(self.run_dir):
            for name in made.get("names", []):
                src, dst = Path(made["dir"]) / name, self.run_dir / name
                if src.is_file() and not dst.exists():
                    dst.parent.mkdir(parents=True, exist_ok=True)
                    shutil.copy2(src, dst)
        return rows

    def listing(self) -> set[str]:
        """Files under the run directory now (what a step adds is recorded with it)."""
        if self.run_dir is None or not self.run_dir.is_dir():
            return set()
        return {str(p.relative_to(self.run_dir)) for p in self.run_dir.rglob("*") if p.is_file()}

    def put(self, step: str, rows: list[dict], files: list[str] = ()) -> None:
        self.steps[step] = rows
        self.files[step] = {"dir": str(self.run_dir), "names": sorted(files)}
        payload = {"config_hash": self.config_hash, "model_key": self.model_key, "steps": self.steps,
                   "files": self.files}
        atomic_write_text(self.path, json.dumps(payload, indent=1, default=str))

    def clear(self) -> None:
        self.path.unlink(missing_ok=True)


# The config groups whose selected method a run's identity names, with the registry declaring
# each method's options (module, registry attribute); README, "Adding a method".
IDENTITY_GROUPS = {"attack": ("bdexp.attacks", "ATTACKS"), "train": ("bdexp.training", "REGIMES")}
# The run record's list of the identity keys that make its case (all but the seed and version).
CASE_KEYS = "case_keys"


def _plain_node(node) -> dict:
    from omegaconf import DictConfig, OmegaConf

    if isinstance(node, DictConfig):
        try:
            return OmegaConf.to_container(node, resolve=True)
        except Exception:  # noqa: BLE001 - an unresolvable interpolation: the failed job's record shows it raw
            return OmegaConf.to_container(node, resolve=False)
    return dict(node) if isinstance(node, dict) else {}


def _registry(group: str):
    import importlib

    module, attr = IDENTITY_GROUPS[group]
    try:
        return getattr(importlib.import_module(module), attr)
    except Exception:  # noqa: BLE001 - a package that does not import: no declarations to compare with
        return None


def declared_defaults(group: str, name: str | None) -> dict:
    """option -> default of method `name` of config group `group`: its registered Options
    declaration (every registered method has one: tests/test_options.py); {} for a name the
    registry does not know (a failed job's record)."""
    if name is None:
        return {}
    registry = _registry(group)
    try:
        declared = registry.options(str(name)) if registry is not None else None
    except Exception:  # noqa: BLE001 - an unknown name (a failed job's record): nothing declared
        declared = None
    return declared.defaults() if declared is not None else {}


def _same(a, b) -> bool:
    """Equal as option values: a list and its tuple are, 1 and 1.0 are, True and 1 are not."""
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    if isinstance(a, bool) or isinstance(b, bool):
        return a is b
    return a == b


def changed_options(group: str, node: dict) -> dict:
    """"<group>.<option>": value for every option of `node` whose value differs from the selected
    method's declared default (a YAML variant's or a sweep's own values), in the node's order."""
    name = node.get("name")
    defaults = declared_defaults(group, name)
    return {f"{group}.{key}": value for key, value in node.items()
            if key != "name" and (key not in defaults or not _same(value, defaults[key]))}


def _regime(train: dict) -> str | None:
    """The regime's own name for the loss it trains with (its `cache_identity` hook: ML-MMDR at
    λ = 0 says "rbt", ML-MMDR §5's regular backdoor training); the selected name otherwise."""
    from omegaconf import OmegaConf

    name = train.get("name")
    registry = _registry("train")
    try:
        return str(registry.get(str(name)).cache_identity(OmegaConf.create(train)).get("name", name))
    except Exception:  # noqa: BLE001 - unknown regime or a hook that rejects the node: its name
        return name


def run_identity(cfg) -> dict:
    """The run-level tags every table groups by, read from the composed config and the registries
    alone (the pipeline adds what needs the built attack; a failed job's record has only these):
    the names of the dataset, model, attack and training regime, the regime's own name for its
    loss (`regime`), every option of the attack and train nodes that differs from the method's
    declared default (`attack.mark`, `train.mmd_weight`, ...), the scale, seed and bdexp version.
    `case_keys` lists the keys that make the run's case (all but the seed and the version)."""
    nodes = {group: _plain_node(cfg.get(group) or {}) for group in IDENTITY_GROUPS}
    ident: dict[str, Any] = {
        "dataset": (cfg.get("dataset") or {}).get("name"),
        "model": (cfg.get("model") or {}).get("name"),
        **{group: node.get("name") for group, node in nodes.items()},
        "regime": _regime(nodes["train"]),
    }
    for group, node in nodes.items():
        ident.update(changed_options(group, node))
    ident["scale"] = cfg.get("scale_name", "full")
    ident[CASE_KEYS] = list(ident)
    ident["seed"] = int(cfg.seed) if cfg.get("seed") is not None else None
    ident["bdexp_version"] = bdexp.__version__
    return ident
