"""Long-format result records and the run's results.json (DESIGN data flow step 9)."""
from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

import bdexp

RESULTS_FILE = "results.json"
# Top-level config keys that change how a run looks or where files go, not what it computes: the
# config hash (jobs.py) leaves them out, and report tables never split rows on them.
HASH_EXCLUDED = ("progress", "cache", "device", "threads", "checkpoint_every")


def record(metric: str, value: float, **tags: Any) -> dict:
    """One long-format row: {"metric": "f1", "value": 0.93, "defense": "ac", "level": "s2", ...}.
    Tags with value None are dropped so pivots stay clean."""
    v = float(value)
    row = {"metric": metric, "value": v if math.isfinite(v) else None}
    row.update({k: t for k, t in tags.items() if t is not None})
    return row


def atomic_write_text(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def write_results(run_dir: Path, run: dict, metrics: list[dict], status: str = "complete") -> Path:
    path = Path(run_dir) / RESULTS_FILE
    payload = {"status": status, "run": run, "metrics": metrics}
    atomic_write_text(path, json.dumps(payload, indent=1, default=str))
    return path


def read_results(path: Path) -> dict:
    return json.loads(Path(path).read_text())


def read_status(path: Path) -> tuple[str, dict]:
    """(status, payload) of a results.json: "complete", "failed", ... or "unreadable" (payload {})."""
    try:
        payload = read_results(path)
    except (OSError, json.JSONDecodeError):
        return "unreadable", {}
    return payload.get("status", "complete"), payload


def run_identity(cfg) -> dict:
    """The run-level tags every table groups by, read from the composed config alone (the pipeline
    adds what needs the built attack; a failed job's record has only these)."""
    attack = cfg.get("attack") or {}
    train = cfg.get("train") or {}
    return {
        "dataset": (cfg.get("dataset") or {}).get("name"),
        "model": (cfg.get("model") or {}).get("name"),
        "attack": attack.get("name"),
        "attack_mode": attack.get("mode"),
        "poison_rate": attack.get("poison_rate"),
        "scenario": attack.get("scenario"),
        "train": train.get("name"),
        "lambda": train.get("mmd_weight"),
        "kernel": train.get("kernel"),
        "seed": int(cfg.seed) if cfg.get("seed") is not None else None,
        "scale": cfg.get("scale_name", "full"),
        "bdexp_version": bdexp.__version__,
    }
