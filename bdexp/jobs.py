"""One sweep job around pipeline.run: skip it when it is already done, record it when it fails,
and give it its own GPU and CPU share (issue 7: "nothing lost").

- **Skip**: a job whose run directory holds a complete results.json with the same config hash is
  not run again, so `bdexp -m ... hydra.sweep.dir=DIR` over an existing sweep only runs what is
  missing or failed (or what changed).
- **Error record**: an exception in a job writes results.json with status "failed", the error
  type, message and traceback, and the run's identity, so `bdexp-report` lists it; in a sweep the
  other jobs go on and the sweep callback (callbacks.py) reports the failure at the end.
- **Pinning**: with `device=auto` and several visible GPUs, job k of a sweep runs on GPU
  k mod #GPUs (joblib/local launchers on one node; under SLURM each job sees only its own GPU).
  With joblib's n_jobs > 1 each job gets cpu_count / n_jobs torch threads, so jobs on a CPU node
  do not oversubscribe the cores (concurrent OpenMP pools spin and slow each other down).
- **Interruptions** (issue 13): SIGINT and SIGTERM (what SLURM sends before it kills a job) raise
  `Interrupted` in the main thread; the pipeline writes results.json with status "interrupted"
  and what it has computed so far, the CLI prints one line and exits 128 + the signal number (130,
  143). An interrupted job is not complete, so a re-run runs it again: training resumes from its
  checkpoint (training/loop.py) and finished defenses and analyses are read back from their
  records (results.PartialRecords). `deferred()` holds a signal back while a file is written.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import signal
import threading
import traceback
from contextlib import contextmanager
from pathlib import Path
from typing import Callable

import torch
from omegaconf import DictConfig, OmegaConf

import bdexp
from bdexp.results import HASH_EXCLUDED, RESULTS_FILE, read_status, run_identity, write_results

log = logging.getLogger(__name__)


def config_hash(cfg: DictConfig) -> str:
    """Hash of the resolved config minus HASH_EXCLUDED (and the bdexp version)."""
    plain = OmegaConf.to_container(cfg, resolve=True)
    for key in HASH_EXCLUDED:
        plain.pop(key, None)
    plain.pop("hydra", None)
    blob = json.dumps({"cfg": plain, "version": bdexp.__version__}, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def completed(run_dir: Path, digest: str) -> bool:
    """True if run_dir/results.json is complete and was computed from the same config."""
    status, payload = read_status(Path(run_dir) / RESULTS_FILE)
    return status == "complete" and payload.get("run", {}).get("config_hash") == digest


def write_failure(run_dir: Path, cfg: DictConfig, digest: str, err: BaseException) -> Path:
    run = {**run_identity(cfg), "config_hash": digest,
           "error": {"type": type(err).__name__, "message": str(err),
                     "traceback": "".join(traceback.format_exception(type(err), err, err.__traceback__))}}
    try:
        run["config"] = OmegaConf.to_container(cfg, resolve=True)
    except Exception:  # an unresolvable interpolation may be the error itself
        run["config"] = OmegaConf.to_container(cfg, resolve=False)
    return write_results(run_dir, run, [], status="failed")


def pinned_device(name: str, job_num: int | None) -> str:
    """`device=auto` in sweep job k with several visible GPUs -> "cuda:<k mod n>"."""
    if name != "auto" or job_num is None or not torch.cuda.is_available():
        return name
    count = torch.cuda.device_count()
    return f"cuda:{job_num % count}" if count > 1 else name


def job_threads(threads, parallel_jobs: int | None) -> int | None:
    """Torch intra-op threads for one job: `threads` if set, else cpu_count / parallel jobs."""
    if threads is not None:
        return max(1, int(threads))
    if parallel_jobs is None or parallel_jobs <= 1:
        return None
    return max(1, (os.cpu_count() or 1) // parallel_jobs)


class Interrupted(BaseException):
    """SIGINT or SIGTERM arrived. A BaseException, so `except Exception` fallbacks (a checkpoint
    that does not load, a table that fails) do not swallow it. `where` is filled in by the code
    that knows what was running ("training at epoch 7/30", "defense ss (2 of 3 done)"); `records`
    collects the records finished before the signal on the way up."""

    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signum = int(signum)
        self.where: str | None = None
        self.records: list[dict] = []

    @property
    def exit_code(self) -> int:
        return 128 + self.signum  # the shell's convention: 130 for SIGINT, 143 for SIGTERM

    def message(self) -> str:
        return f"interrupted during {self.where or 'startup'}; run the same command to resume"


_state = {"defer": 0, "pending": None, "raised": False}
SIGNALS = (signal.SIGINT, signal.SIGTERM)


def _on_signal(signum, frame) -> None:
    if _state["raised"]:  # a second signal while the first is being recorded: finish recording
        return
    if _state["defer"]:
        _state["pending"] = signum
        return
    _state["raised"] = True
    raise Interrupted(signum)


@contextmanager
def interruptible():
    """SIGINT/SIGTERM raise Interrupted inside this block (main thread only; elsewhere, e.g. in a
    launcher's worker thread, the block runs with the handlers it had)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {s: signal.signal(s, _on_signal) for s in SIGNALS}
    _state.update(defer=0, pending=None, raised=False)
    try:
        yield
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)


@contextmanager
def deferred():
    """Hold SIGINT/SIGTERM back until the block is done (a checkpoint or record being written
    stays whole and leaves no temporary file), then raise Interrupted for it."""
    _state["defer"] += 1
    try:
        yield
    finally:
        _state["defer"] -= 1
        pending = _state["pending"]
        if not _state["defer"] and pending is not None and not _state["raised"]:
            _state["pending"] = None
            _state["raised"] = True
            raise Interrupted(pending)


def run_recorded(kind: str, steps: list[tuple[str, str, Callable[[], list[dict]]]], store=None) -> list[dict]:
    """Run `steps` ((key, name, compute), compute() -> records) in order and return their records.
    With a results.PartialRecords `store`, a step it already holds is not computed again (its
    records are read back) and each computed step's records are stored as soon as it finishes.
    On an interrupt the exception says which step was running and carries the finished records."""
    rows: list[dict] = []
    done, current = 0, None
    try:
        for key, name, compute in steps:
            current = name
            step = f"{kind}:{key}"
            stored = store.get(step) if store is not None else None
            if stored is not None:
                log.info("%s %s: skipped, %d record(s) of an earlier run of this config read from %s",
                         kind, name, len(stored), store.path)
            else:
                log.info("%s %s", kind, name)
                before = store.listing() if store is not None else set()
                found = compute()
            with deferred():
                if stored is None and store is not None:
                    store.put(step, found, files=store.listing() - before - {"partial.json"})
                rows.extend(found if stored is None else stored)
                done += 1
    except Interrupted as err:
        err.where = f"{kind} {current} ({done} of {len(steps)} done)"
        err.records.extend(rows)
        raise
    return rows
