"""Hydra callback that closes a sweep with a job summary (configured in conf/config.yaml).

Every job of a sweep either wrote complete results this time, was skipped because complete
results for the same config were already there (jobs.py), or failed and left an error record.
The summary names the failed jobs and their errors, and the sweep exits with status 1 if any
failed, so scripts notice; nothing already computed is lost either way. An interrupted sweep
(SIGINT, SIGTERM, SIGHUP: jobs.forwarding) ends with one line from `bdexp` instead
(`interrupted_sweep_line`), and each job's worker process keeps living between jobs
(`on_job_start`), so a signal does not kill it while other jobs still write their records.
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


_current: dict[str, Path | None] = {"sweep_dir": None}  # the sweep this process launches


def sweep_dir() -> Path | None:
    """The directory of the sweep this process launched, None outside a sweep."""
    return _current["sweep_dir"]


def interrupted_sweep_line() -> str | None:
    """What `bdexp` says when the sweep it launched was interrupted; None outside a sweep."""
    where = sweep_dir()
    if where is None:
        return None
    groups = sweep_status(where) if where.is_dir() else {}
    stopped = len(groups.get("interrupted", []))
    kept = (f"{stopped} job(s) interrupted, their results.json keep what finished" if stopped
            else "no job was interrupted mid-run")
    counts = "".join(f", {len(groups[k])} {name}" for k, name in
                     (("complete", "complete"), ("failed", "failed"), ("missing", "without results")) if groups.get(k))
    return f"sweep interrupted: {kept}{counts}; run the same command with hydra.sweep.dir={where} to resume"


class SweepSummary(Callback):
    def __init__(self, exit_on_failure: bool = True) -> None:
        self.exit_on_failure = exit_on_failure
        self.start: float | None = None
        _current["sweep_dir"] = None

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        self.start = time.time()
        _current["sweep_dir"] = Path(str(config.hydra.sweep.dir))

    def on_job_start(self, config: DictConfig, **kwargs: Any) -> None:
        from bdexp import jobs

        jobs.shield_sweep_worker()

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        from bdexp import jobs
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
        if jobs.interrupt_signal() is not None:  # bdexp's one line says what was kept (cli.main)
            return
        if any(groups.get(k) for k in ("failed", "missing", "interrupted", "unreadable")):
            console.print(f"  re-run the same command with hydra.sweep.dir={sweep_dir} to run only these jobs")
            if self.exit_on_failure and groups["failed"]:
                sys.exit(1)
