"""One sweep job around pipeline.run: skip it when it is already done, record it when it fails,
and give it its own GPU and CPU share: nothing computed is lost.

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
- **Interruptions**: SIGINT and SIGTERM (what SLURM sends before it kills a job) raise
  `Interrupted` in the main thread; the pipeline writes results.json with status "interrupted"
  and what it has computed so far, the CLI prints one line and exits 128 + the signal number (130,
  143). An interrupted job is not complete, so a re-run runs it again: training resumes from its
  checkpoint (training/loop.py) and finished defenses and analyses are read back from their
  records (results.PartialRecords). `deferred()` holds a signal back while a file is written.
  SIGHUP (the terminal closed) is an interrupt too (exit 129), unless it is ignored (`nohup`).
- **Sweeps with worker processes** (joblib, submitit_local): the `bdexp` process itself
  (`forwarding()`, cli.main) passes SIGTERM on to its workers and waits up to FORWARD_GRACE_S for
  them: each running job writes its "interrupted" results.json and returns to the sweep (a worker
  lives on between jobs, so the sweep's other jobs are not killed with it), then the command
  prints one line and exits 128 + the signal number.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import signal
import stat
import threading
import time
import traceback
from contextlib import contextmanager
from pathlib import Path
from typing import Callable

from omegaconf import DictConfig, OmegaConf

import bdexp
from bdexp.results import (EDITED, HASH_EXCLUDED, RESULTS_FILE, read_status, results_problem, run_identity,
                           write_results)

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
    """True if run_dir/results.json is complete and was computed from the same config. A file whose
    digest or records say it was edited after the run (results.results_problem) is not: it is
    computed again (and set aside first, `set_aside_results`)."""
    status, payload = read_status(Path(run_dir) / RESULTS_FILE)
    if status == EDITED:
        log.warning("%s: %s; it is not trusted and the run is computed again", Path(run_dir) / RESULTS_FILE,
                    results_problem(payload))
    return status == "complete" and payload.get("run", {}).get("config_hash") == digest


def results_in_the_way(run_dir: Path, digest: str) -> tuple[str, str] | None:
    """(what, its config hash) of a results.json in `run_dir` that this run would replace and that
    is not its own: complete results of another config, or a file edited after its run; None when
    there is none (no file, an unreadable one, or this config's own failed/interrupted record)."""
    status, payload = read_status(Path(run_dir) / RESULTS_FILE)
    other = str(payload.get("run", {}).get("config_hash"))
    if status == EDITED:
        return "an edited results.json", other
    if status == "complete" and other != digest:
        return f"complete results of another config (hash {other})", other
    return None


def set_aside_results(run_dir: Path, what: str, other_hash: str) -> Path:
    """Keep the results.json in the way under `results.<its config hash>.json` (`.edited` added for
    an edited one) beside it, with a warning, so the new run does not replace them silently."""
    path = Path(run_dir) / RESULTS_FILE
    tag = f"{other_hash}.edited" if what.startswith("an edited") else other_hash
    kept = path.with_name(f"results.{tag}.json")
    os.replace(path, kept)
    log.warning("%s held %s; kept as %s, this run writes a new %s", run_dir, what, kept.name, RESULTS_FILE)
    return kept


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
    import torch  # here: `bdexp` imports this module for its signal handlers before any run

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
    """SIGINT, SIGTERM or SIGHUP arrived. A BaseException, so `except Exception` fallbacks (a checkpoint
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


# defer/pending/raised: the current interruptible block; seen: the first signal this process acted
# on (cli.main's exit status); started: interruptible blocks entered (a run started).
_state = {"defer": 0, "pending": None, "raised": False, "seen": None, "started": 0}
SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
SWEEP_PARENT = "BDEXP_SWEEP_PARENT"  # the pid of the `bdexp` command, in its and its workers' environment
FORWARD_EVERY_S = 0.5  # a sweep's workers get SIGTERM this often, so a job that starts late stops too
FORWARD_GRACE_S = 10.0  # how long `bdexp` waits for its workers after a signal before SIGKILL


def _install(handler) -> dict:
    """Set `handler` for SIGNALS, except a signal that is ignored (`nohup` ignores SIGHUP); returns
    the previous handlers."""
    return {s: signal.signal(s, handler) for s in SIGNALS if signal.getsignal(s) is not signal.SIG_IGN}


def _restore(previous: dict) -> None:
    for s, handler in previous.items():
        signal.signal(s, handler)


def _leave_closed_terminal() -> None:
    """After SIGHUP the terminal is gone and writing to it fails (EIO): stdout and stderr that
    were a terminal go to /dev/null, so the run still records itself and exits 129."""
    null = os.open(os.devnull, os.O_WRONLY)
    try:
        for fd in (1, 2):
            mode, device = os.fstat(fd).st_mode, os.fstat(fd).st_rdev
            if stat.S_ISCHR(mode) and device != os.fstat(null).st_rdev:
                os.dup2(null, fd)
    except OSError:  # a closed descriptor: nothing to redirect
        pass
    finally:
        os.close(null)


def _raise(signum: int):
    if signum == signal.SIGHUP:
        _leave_closed_terminal()
    _state["raised"] = True
    _state["seen"] = _state["seen"] or signum
    raise Interrupted(signum)


def _on_signal(signum, frame) -> None:
    if _state["raised"]:  # a second signal while the first is being recorded: finish recording
        return
    if _state["defer"]:
        _state["pending"] = signum
        return
    _raise(signum)


def in_sweep_worker() -> bool:
    """True in a worker process of a `bdexp` sweep (a joblib or submitit_local job): a child of the
    `bdexp` command (`forwarding` signals only those). A SLURM job inherits the variable with the
    submitting environment but is no child of it: there a signal ends the job as in a single run,
    and the SLURM launcher records what SLURM did."""
    parent = os.environ.get(SWEEP_PARENT)
    return parent is not None and parent == str(os.getppid())


@contextmanager
def interruptible():
    """SIGINT/SIGTERM/SIGHUP raise Interrupted inside this block (main thread only; elsewhere, e.g.
    in a launcher's worker thread, the block runs with the handlers it had). In a sweep's worker
    process the job ends here: the interrupt is logged (its record is written) and the worker
    returns to the sweep, which stops (see forwarding)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = _install(_on_signal)
    _state.update(defer=0, pending=None, raised=False, started=_state["started"] + 1)
    try:
        yield
    except Interrupted as err:
        if not in_sweep_worker():
            raise
        log.warning("job interrupted during %s; its results.json keeps what finished", err.where or "startup")
    finally:
        _restore(previous)


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
            _raise(pending)


def interrupt_signal() -> int | None:
    """The signal this process was interrupted by (inside a run or outside), if any."""
    return _state["seen"]


def interrupted_run_line() -> str:
    """What `bdexp` says of a run interrupted outside its interruptible block."""
    if _state["started"]:
        return "interrupted after the run ended; its results.json is as the run left it"
    return "interrupted before the run started; nothing was computed"


def _note_signal(signum, frame) -> None:
    """A sweep worker between jobs: the signal is remembered, the worker lives on (forwarding)."""
    _state["seen"] = _state["seen"] or signum


def shield_sweep_worker() -> None:
    """In a sweep's worker process (called as each job starts): a signal outside a job's
    interruptible block no longer ends the worker. A loky worker that dies makes joblib kill all
    the others at once, before they have written their jobs' records."""
    if in_sweep_worker() and threading.current_thread() is threading.main_thread():
        _install(_note_signal)


def _children() -> list[int]:
    """Live child processes of this one that do not ignore SIGTERM (joblib's resource trackers
    ignore it and end with this process). Linux /proc; elsewhere none."""
    me, found = str(os.getpid()), []
    if not Path("/proc/self/status").exists():
        return found
    for entry in Path("/proc").glob("[0-9]*/status"):
        try:
            fields = dict(line.split(":", 1) for line in entry.read_text().splitlines() if ":" in line)
        except OSError:  # ended meanwhile
            continue
        running = fields.get("State", "Z").split()[0] not in "ZX"  # not a zombie waiting to be reaped
        ignores_term = int(fields.get("SigIgn", "0"), 16) >> (signal.SIGTERM - 1) & 1
        if fields.get("PPid", "").strip() == me and running and not ignores_term:
            found.append(int(entry.parent.name))
    return found


def _signal_children(sig: int) -> int:
    """Send `sig` to this process's children (_children); how many there were."""
    pids = _children()
    for pid in pids:
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            pass
    return len(pids)


def _keep_forwarding(stop: threading.Event) -> None:
    """SIGTERM to the children every FORWARD_EVERY_S until `stop`; SIGKILL to those left after
    FORWARD_GRACE_S, so no worker outlives the command."""
    deadline = time.monotonic() + FORWARD_GRACE_S
    while not stop.wait(FORWARD_EVERY_S):
        if time.monotonic() > deadline:
            _signal_children(signal.SIGKILL)
            return
        _signal_children(signal.SIGTERM)


@contextmanager
def forwarding():
    """The `bdexp` command's handlers (cli.main) outside a run's own interruptible block. A signal
    with no worker processes running (composing the config, between the jobs of an in-process
    sweep) raises Interrupted. With workers (joblib, submitit_local) it is passed on to them as
    SIGTERM, and the command goes on waiting for them: each running job writes its record and
    returns (interruptible), the launcher returns, and cli.main exits 128 + the signal number.
    Later signals are ignored, and stay ignored while the process exits after an interrupt, so a
    second Ctrl-C prints no traceback from an exit handler."""
    stop = threading.Event()

    def on_signal(signum, frame):
        if _state["seen"] is not None or _state["raised"]:  # already handling one
            return
        _state["seen"] = signum
        if signum == signal.SIGHUP:
            _leave_closed_terminal()
        if not _signal_children(signal.SIGTERM):
            raise Interrupted(signum)
        threading.Thread(target=_keep_forwarding, args=(stop,), name="bdexp-forward", daemon=True).start()

    previous = _install(on_signal)
    _state.update(seen=None, raised=False, started=0)
    os.environ[SWEEP_PARENT] = str(os.getpid())
    try:
        yield
    finally:
        stop.set()
        os.environ.pop(SWEEP_PARENT, None)
        if _state["seen"] is None:
            _restore(previous)
        else:
            _install(signal.SIG_IGN)


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
