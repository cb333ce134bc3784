"""Hydra callback that closes a sweep with a job summary (configured in conf/config.yaml).

Every job of a sweep either wrote complete results this time, was skipped because complete
results for the same config were already there (jobs.py), or failed and left an error record.
The summary names the failed jobs and their errors, and the sweep exits with status 1 if any
failed, so scripts notice; nothing already computed is lost either way.
"""
from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig

from bdexp.results import RESULTS_FILE, read_status


def sweep_status(sweep_dir: Path, since: float | None = None) -> dict[str, list[tuple[Path, dict]]]:
    """Jobs under `sweep_dir` grouped by status: complete, skipped (complete and older than
    `since`), failed, missing (a job directory without results.json), and any other status a
    results.json has: interrupted (jobs.Interrupted), unreadable (truncated or corrupt)."""
    groups: dict[str, list] = {"complete": [], "skipped": [], "failed": [], "missing": []}
    for job_dir in sorted(p for p in Path(sweep_dir).iterdir() if p.is_dir() and (p / ".hydra").exists()):
        path = job_dir / RESULTS_FILE
        if not path.exists():
            groups["missing"].append((job_dir, {}))
            continue
        status, payload = read_status(path)
        if status == "complete" and since is not None and path.stat().st_mtime < since:
            status = "skipped"
        groups.setdefault(status, []).append((job_dir, payload))
    return groups


class SweepSummary(Callback):
    def __init__(self, exit_on_failure: bool = True) -> None:
        self.exit_on_failure = exit_on_failure
        self.start: float | None = None

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        self.start = time.time()

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        from bdexp.console import console

        sweep_dir = Path(config.hydra.sweep.dir)
        if not sweep_dir.exists():
            return
        groups = sweep_status(sweep_dir, self.start)
        counts = ", ".join(f"{len(v)} {k}" for k, v in groups.items() if v)
        console.print(f"[bold]sweep {sweep_dir}:[/] {counts}")
        for job_dir, payload in groups["failed"]:
            err = payload.get("run", {}).get("error", {})
            console.print(f"  [red]failed[/] {job_dir.name}: {err.get('type')}: {err.get('message')}")
        if any(groups.get(k) for k in ("failed", "missing", "interrupted", "unreadable")):
            console.print(f"  re-run the same command with hydra.sweep.dir={sweep_dir} to run only these jobs")
            if self.exit_on_failure and groups["failed"]:
                sys.exit(1)
