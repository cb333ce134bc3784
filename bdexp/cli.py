"""`bdexp`: a thin Hydra entry point around pipeline.run, wrapped by jobs.py (skip a job that is
already complete, record one that fails, pin a sweep job to its GPU and CPU share).

What a user sees when something is wrong: a user error (a bad value, an unknown key
or group option, a run or cache directory that cannot be written, a full disk) is one line on
stderr, `bdexp error: ...`, and exit status 2; a bug is one traceback on stderr and status 1.
Results go to stdout."""
from __future__ import annotations

import errno
import sys

import hydra
from omegaconf import DictConfig

# OSErrors that are the environment's, not a bug: a full disk, a read-only or foreign path, a
# file where a directory should be (or the reverse).
USER_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM,
                         errno.ENOTDIR, errno.EEXIST, errno.EISDIR, errno.ENAMETOOLONG})


@hydra.main(version_base="1.3", config_path="pkg://bdexp.conf", config_name="config")
def _main(cfg: DictConfig) -> float | None:
    # Imports live inside: process launchers (joblib, submitit) pickle this function by value,
    # so it must not capture module globals such as the rich console (it holds a lock).
    import logging
    import os
    from pathlib import Path

    import torch
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode
    from omegaconf import open_dict

    from bdexp import jobs, objective, pipeline, validation
    from bdexp.console import print_error
    from bdexp.errors import BdexpError

    log = logging.getLogger("bdexp.cli")
    hc = HydraConfig.get()
    run_dir = Path(hc.runtime.output_dir)
    in_sweep = hc.mode == RunMode.MULTIRUN
    n_jobs = hc.launcher.get("n_jobs") if in_sweep else None
    job_num = hc.job.num if in_sweep else None
    del hc  # Hydra's node names the attack (runtime.choices): no frame holds it while a defense runs
    try:  # before any work: every value's type and range, a writable run dir and cache dir
        validation.check_run(cfg, run_dir, "hydra.sweep.dir" if in_sweep else "hydra.run.dir")
    except BdexpError as err:
        record_failure(run_dir, cfg, None, err, keep_existing=True)
        print_error(err)
        if not in_sweep:
            sys.exit(2)
        return
    digest = jobs.config_hash(cfg)
    if jobs.completed(run_dir, digest):
        log.info("skipped: %s already holds complete results for this config (hash %s)", run_dir, digest)
        return objective.run_objective(cfg, run_dir)  # a sweeper still gets the job's number
    in_the_way = jobs.results_in_the_way(run_dir, digest)
    if in_the_way is not None and not in_sweep and in_the_way[0].startswith("complete"):
        # one run pointed at a directory of another: refuse rather than replace what it computed
        print_error(f"{run_dir} already holds {in_the_way[0]}; this config (hash {digest}) would replace them: "
                    f"choose another hydra.run.dir, or move {run_dir / 'results.json'} away to replace them")
        sys.exit(2)
    if in_the_way is not None:  # a sweep re-run whose job changed, or an edited file: keep both
        jobs.set_aside_results(run_dir, *in_the_way)
    if n_jobs is not None and int(n_jobs) < 0:  # joblib: -1 = all cores
        n_jobs = os.cpu_count()
    threads = jobs.job_threads(cfg.get("threads"), int(n_jobs) if n_jobs else None)
    if threads is not None:
        torch.set_num_threads(threads)
    with open_dict(cfg):
        cfg.device = jobs.pinned_device(str(cfg.device), job_num)
    payload = None
    try:
        with jobs.interruptible():  # SIGINT/SIGTERM: results so far kept, one line, exit 130/143
            payload = pipeline.run(cfg, run_dir, config_hash=digest)
    except jobs.Interrupted as err:
        print(err.message(), file=sys.stderr)
        sys.exit(err.exit_code)
    except Exception as err:  # a user error: one line; a bug: its record, then one traceback
        message = user_message(err)
        path = record_failure(run_dir, cfg, digest, err)
        if message is not None:
            print_error(message)
            if not in_sweep:
                sys.exit(2)
        elif in_sweep:  # the sweep goes on: this job's traceback goes to its log, once
            log.exception("job failed with a bug; error record in %s", path)
        else:  # main() prints the traceback
            err.bdexp_record = path
            raise
    # The number a sweeper (hydra/sweeper=optuna) optimises, when the config names one; outside the
    # try: an objective that matches no record is a config error that stops the sweep.
    return objective.run_objective(cfg, payload) if payload is not None else None


def record_failure(run_dir, cfg: DictConfig, digest: str | None, err: BaseException,
                   keep_existing: bool = False):
    """results.json with status "failed", unless the run dir holds complete results (computed
    earlier, possibly for another config: they stay as they are) or, with `keep_existing` (an
    error found before any work), any readable results. None when nothing was written: the run
    dir may be the very thing that cannot be written."""
    from pathlib import Path

    from bdexp import jobs
    from bdexp.results import RESULTS_FILE, read_status

    status, _ = read_status(Path(run_dir) / RESULTS_FILE)
    if status == "complete" or (keep_existing and status != "unreadable"):
        return None
    try:
        return jobs.write_failure(run_dir, cfg, digest, err)
    except Exception:  # an unwritable directory, or a value run_identity cannot read (seed=abc)
        return None


def check_override_digits(overrides) -> None:
    """A ConfigError for an override holding an integer longer than Python converts from text
    (`sys.get_int_max_str_digits()`, 4300 digits by default): Hydra's parser would fail on it with a
    ValueError deep in its grammar. No bdexp key takes such a number."""
    import re

    from bdexp.errors import ConfigError

    limit = sys.get_int_max_str_digits() if hasattr(sys, "get_int_max_str_digits") else 0
    if not limit:
        return
    for override in overrides:
        run = max((len(m) for m in re.findall(r"\d+", str(override))), default=0)
        if run > limit:
            key = str(override).partition("=")[0]
            raise ConfigError(f"override {key}=<{run} digits> holds an integer of {run} digits (Python reads at most "
                              f"{limit}); no bdexp key takes such a number: check the value of {key}")


def _raised_by_mkdir(err: BaseException) -> bool:
    """True when the innermost frame of `err`'s traceback is a mkdir (os.makedirs, Path.mkdir)."""
    tb, last = err.__traceback__, None
    while tb is not None:
        last, tb = tb, tb.tb_next
    return last is not None and last.tb_frame.f_code.co_name in ("mkdir", "makedirs")


def user_message(err: BaseException) -> str | None:
    """The one line a user error prints, or None for a bug."""
    from bdexp.errors import BdexpError

    if isinstance(err, BdexpError):
        return str(err)
    if isinstance(err, OSError) and err.errno == errno.ENOENT and _raised_by_mkdir(err):
        # a directory that cannot be made where the user pointed (hydra.run.dir=/proc/x, ...)
        return (f"cannot create the directory {err.filename or 'asked for'} ({err.strerror}); point "
                f"hydra.run.dir (sweeps: hydra.sweep.dir) and cache.dir at a writable place")
    if isinstance(err, OSError) and err.errno in USER_ERRNOS:
        where = err.filename or "a file"
        if err.errno in (errno.ENOSPC, errno.EDQUOT):
            return (f"the disk is full writing {where}; free space, or point hydra.run.dir and "
                    f"cache.dir at another disk")
        if err.errno == errno.EEXIST:
            return f"cannot create the directory {where}: a file of that name is in the way"
        if err.errno == errno.ENOTDIR:
            return f"cannot use {where}: part of that path is a file, not a directory"
        target = f" -> {err.filename2}" if err.filename2 else ""
        return f"{err.strerror or 'cannot access'}: {where}{target}"
    return None


def hydra_message(err: BaseException) -> str | None:
    """A Hydra or omegaconf composition error (unknown key or option, bad override syntax) on
    one line, or None when `err` is not one."""
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    if not isinstance(err, (HydraException, OmegaConfBaseException)):
        return None
    parts: list[str] = []
    for source in (err, err.__cause__):
        if not isinstance(source, (HydraException, OmegaConfBaseException)):
            continue
        lines = [line.strip() for line in str(source).splitlines()]
        if "Config search path:" in lines:
            lines = lines[:lines.index("Config search path:")]
        lines = [line for line in lines if line and not line.startswith(
            ("full_key:", "object_type=", "reference_type=", "See https://hydra.cc"))]
        joined: list[str] = []
        listing = False  # "Available options in 'dataset':" then one option a line -> "...: a, b, c"
        for line in lines:
            if listing and not line.endswith(":"):
                joined[-1] += ("" if joined[-1].endswith(":") else ",") + " " + line
            else:
                joined.append(line)
                listing = line.endswith(":")
        text = " ".join(joined)
        override = getattr(source, "override", None)
        if override and override not in text:
            text = f"override {override!r}: {text}"
        if text and text not in parts:
            parts.append(text)
    return " ".join(parts) or type(err).__name__


def main() -> None:
    """The `bdexp` command. Hydra's own error report (a message, or a trimmed traceback, then
    exit 1) is replaced by ours: Hydra raises (HYDRA_FULL_ERROR for this call) and a composition
    or user error becomes one line and exit 2, a bug one traceback and exit 1. A user who sets
    HYDRA_FULL_ERROR gets Hydra's full traceback as before. SIGINT, SIGTERM and SIGHUP
    (jobs.forwarding) are one line saying what was kept and exit 128 + the signal's number."""
    import os
    import traceback

    from bdexp import callbacks, jobs
    from bdexp.console import print_error

    def run() -> None:
        """_main under the command's signal handlers: a sweep's worker processes get the signal
        and record their jobs; then one line for the run or the sweep."""
        with jobs.forwarding():
            try:
                _main()
            except BaseException as err:
                # no signal, or a run (or in-process sweep job) that printed its own line
                if jobs.interrupt_signal() is None or (isinstance(err, SystemExit) and callbacks.sweep_dir() is None):
                    raise
            signum = jobs.interrupt_signal()
            if signum is not None:
                print_error(callbacks.interrupted_sweep_line() or jobs.interrupted_run_line(), prefix="bdexp")
                sys.exit(128 + signum)

    if os.environ.get("HYDRA_FULL_ERROR"):
        run()
        return
    os.environ["HYDRA_FULL_ERROR"] = "1"
    try:
        check_override_digits(sys.argv[1:])  # before the signal handlers: cheap, and no torch import
        run()
    except KeyboardInterrupt:  # Ctrl-C before the run's own handlers are in place (composing, launching)
        print_error("interrupted before the run started; nothing was computed", prefix="bdexp")
        sys.exit(130)
    except BrokenPipeError:  # `bdexp --help | head`: the reader left; nothing to report
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        sys.exit(141)
    except Exception as err:
        message = hydra_message(err) or user_message(err)
        if message is None:  # a bug: its traceback once, from the task function down
            tb = err.__traceback__
            node = tb
            while node is not None and node.tb_frame.f_code.co_name != "run_job":
                node = node.tb_next
            start = node.tb_next if node is not None and node.tb_next is not None else tb
            traceback.print_exception(type(err), err, start)
            record = getattr(err, "bdexp_record", None)
            print_error(f"the traceback above is a bug in bdexp, not a problem with the input; please report it"
                        + (f" (error record: {record})" if record else ""), prefix="bdexp")
            sys.exit(1)
        print_error(message)
        sys.exit(2)
    finally:
        os.environ.pop("HYDRA_FULL_ERROR", None)
