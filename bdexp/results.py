"""Long-format result records and the run's results.json (a `run` object and a list of `metrics`)."""
from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import shutil
from pathlib import Path
from typing import Any

import bdexp
from bdexp.atomic import atomic_write_text

log = logging.getLogger(__name__)

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


DIGEST = "digest"  # results.json's own key: sha256 of the rest (results_digest)
# Records whose value is a rate or a score in [0, 1] wherever they appear (bdexp/metrics.py).
RATES = frozenset({"ba", "asr", "tmr", "ra", "der", "c", "a", "f1", "f1_max", "precision", "recall", "auroc", "aupr", "tpr95",
                   "tpr", "fpr", "clean_acc_undefended"})
TOLERANCE = 1e-9  # float slack of the consistency checks


def results_digest(payload: dict) -> str:
    """sha256 of a results payload (without its digest) in canonical JSON: what results.json was
    when bdexp wrote it, so a hand edit is told apart from a computed result."""
    body = {k: v for k, v in payload.items() if k != DIGEST}
    return hashlib.sha256(json.dumps(body, sort_keys=True, default=str).encode()).hexdigest()


def write_with_digest(path: Path, payload: dict) -> Path:
    """Write `payload` as JSON (values JSON cannot hold as their text) with its `results_digest`."""
    payload = json.loads(json.dumps(payload, default=str))  # as it will read back
    payload[DIGEST] = results_digest(payload)
    return atomic_write_text(path, json.dumps(payload, indent=1))


def write_results(run_dir: Path, run: dict, metrics: list[dict], status: str = "complete") -> Path:
    return write_with_digest(Path(run_dir) / RESULTS_FILE, {"status": status, "run": run, "metrics": metrics})


def inconsistencies(metrics: list) -> list[str]:
    """Values no computation of bdexp gives, in the records of one run: a rate outside [0, 1], a
    negative count or time, a triggered-and-correct rate (TMR, ISPL eq. 7) above the attack success
    rate it is a part of, a robust accuracy that with the ASR beside it counts more images than
    there are (RA + ASR <= 1: a triggered image goes to the target or to its true class, never
    both), an F1 other than the harmonic mean of the precision and recall beside it."""
    problems: list[str] = []
    groups: dict[str, dict[str, float]] = {}
    for rec in metrics:
        if not isinstance(rec, dict):
            continue
        name, value = rec.get("metric"), rec.get("value")
        if value is None or isinstance(value, bool) or not isinstance(value, (int, float)):
            continue
        tags = json.dumps({k: v for k, v in rec.items() if k not in ("metric", "value")}, sort_keys=True, default=str)
        groups.setdefault(tags, {})[str(name)] = float(value)
        if name in RATES and not -TOLERANCE <= value <= 1 + TOLERANCE:
            problems.append(f"{name} = {value} (tags {tags}) is not in [0, 1]")
        elif str(name).startswith(("n_", "wall_s", "defense_wall_s")) and value < 0:
            problems.append(f"{name} = {value} (tags {tags}) is negative")
    for tags, got in groups.items():
        if "tmr" in got and "asr" in got and got["tmr"] > got["asr"] + TOLERANCE:
            problems.append(f"tmr {got['tmr']} > asr {got['asr']} (tags {tags}): TMR counts a subset of ASR's images")
        if "ra" in got and "asr" in got and got["ra"] + got["asr"] > 1 + TOLERANCE:
            problems.append(f"ra {got['ra']} + asr {got['asr']} > 1 (tags {tags}): no triggered image counts for both")
        if "a" in got and "asr" in got and got["a"] > got["asr"] + TOLERANCE:
            problems.append(f"a (TMR) {got['a']} > asr {got['asr']} (tags {tags})")
        if {"f1", "precision", "recall"} <= set(got):
            p, r, f1 = got["precision"], got["recall"], got["f1"]
            want = 2 * p * r / (p + r) if p + r > 0 else 0.0
            if abs(f1 - want) > 1e-6:
                problems.append(f"f1 {f1} is not the harmonic mean {want:.6f} of precision {p} and recall {r} (tags {tags})")
    return problems


def _kind(value) -> str:
    return "null" if value is None else type(value).__name__


def _record_problem(i: int, rec) -> str | None:
    """Why metric record `i` is not one results.record writes (a `metric` name and a numeric or
    null `value`); None when it is."""
    where = f"metrics[{i}]"
    if not isinstance(rec, dict):
        return f"{where} is a {_kind(rec)}, not a record object"
    if not isinstance(rec.get("metric"), str):
        return f"{where} has no metric name" if "metric" not in rec else f"{where}.metric is a {_kind(rec['metric'])}"
    if "value" not in rec:
        return f"{where} ({rec['metric']}) has no value"
    value = rec["value"]
    if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))):
        return f"{where} ({rec['metric']}) has value {value!r}, not a number"
    return None


def shape_problem(payload) -> str | None:
    """Why a parsed results.json is not shaped as write_results writes it (an object with a
    `run` object, a list of `metrics` records and an optional `status` text); None when it is."""
    if not isinstance(payload, dict):
        return f"a JSON {_kind(payload)}, not a results object"
    for key, kind, what in (("run", dict, "an object"), ("metrics", list, "a list")):
        if key not in payload:
            return f"no {key!r} entry, so not a bdexp results.json"
        if not isinstance(payload[key], kind):
            return f"{key!r} is a {_kind(payload[key])}, not {what}"
    if not isinstance(payload.get("status", "complete"), str):
        return f"'status' is a {_kind(payload['status'])}, not a text"
    run = payload["run"]
    for key, kind, what in (("config", dict, "an object"), (CASE_KEYS, list, "a list")):
        if run.get(key) is not None and not isinstance(run[key], kind):
            return f"run.{key} is a {_kind(run[key])}, not {what}"
    if not all(isinstance(k, str) for k in run.get(CASE_KEYS) or []):
        return f"run.{CASE_KEYS} holds something other than key names"
    seed = run.get("seed")
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, (int, float))):
        return f"run.seed is {seed!r}, not a number"
    return next((p for i, rec in enumerate(payload["metrics"]) if (p := _record_problem(i, rec))), None)


def trust_problem(payload: dict) -> str | None:
    """Why a well-shaped results.json cannot be trusted as bdexp wrote it (None when it can): its
    digest does not match its contents (edited after writing), or its records are inconsistent
    (`inconsistencies`; also checked for a file without a digest, from an older bdexp or written
    by hand)."""
    digest = payload.get(DIGEST)
    if digest is not None and digest != results_digest(payload):
        return "its contents do not match the digest bdexp wrote with them (edited after the run)"
    metrics = payload.get("metrics")
    found = inconsistencies(metrics if isinstance(metrics, list) else [])
    if found:
        return f"its records are inconsistent: {found[0]}" + (f" (and {len(found) - 1} more)" if len(found) > 1 else "")
    return None


def results_problem(payload) -> str | None:
    """Why a parsed results.json is not one to use (not shaped as bdexp writes it, or not what bdexp
    computed: `shape_problem`, `trust_problem`); None when it is."""
    return shape_problem(payload) or trust_problem(payload)


def read_results(path: Path) -> dict:
    return json.loads(Path(path).read_text())


# What reading a results.json may raise when it is truncated, random bytes or not JSON
# (JSONDecodeError and UnicodeDecodeError are ValueErrors).
UNREADABLE = (OSError, ValueError)


EDITED = "edited"  # read_status of a results.json that results_problem refuses


def read_status(path: Path) -> tuple[str, dict]:
    """(status, payload) of a results.json: "complete", "failed", "interrupted", ..., "unreadable"
    (payload {}) for a missing, truncated or corrupt file or one not shaped as bdexp writes it, or
    EDITED for one whose digest or records say it is not what bdexp computed (`trust_problem`):
    never counted as complete."""
    try:
        payload = read_results(path)
    except UNREADABLE:
        return "unreadable", {}
    if shape_problem(payload) is not None:
        return "unreadable", {}
    if trust_problem(payload) is not None:
        return EDITED, payload
    return payload.get("status", "complete"), payload


class PartialRecords:
    """The records of every defense and analysis a run has finished, written atomically as each
    one finishes, so a re-run of an interrupted (or failed) run reads them back instead of
    recomputing them (a 3-hour run killed in its last defense loses minutes, not hours).

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
        if ok and stored.get(DIGEST) != results_digest(stored):  # edited by hand: recompute, as results.json
            log.warning("ignoring the partial records %s: they do not match the digest stored with them", self.path)
            ok = False
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
        write_with_digest(self.path, {"config_hash": self.config_hash, "model_key": self.model_key,
                                      "steps": self.steps, "files": self.files})

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
