"""Long-format result records and the run's results.json (DESIGN data flow step 9)."""
from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

RESULTS_FILE = "results.json"


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
