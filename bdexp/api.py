"""bdexp from Python: compose a config, run it, and read results back as the DataFrame
`bdexp-report` builds, from a script or a notebook instead of a shell.

    import bdexp
    cfg = bdexp.compose(["attack=blended", "train.epochs=3"])  # the CLI's config, validated
    res = bdexp.run(cfg)                                      # or bdexp.run(["attack=blended", ...])
    res.metric("asr"), res.records                            # one value; the long-format records
    df = bdexp.collect("outputs/multirun/<date>/<time>")      # every run of a sweep

Everything goes through the code the CLI uses: Hydra's compose API on the same config tree
(bdexp.conf), `validation.validate_config`, `pipeline.run` and `report.collect.collect`, so a
config, a results.json and a frame made here are the ones `bdexp` and `bdexp-report` make. This
module imports nothing heavy at import time: `import bdexp` stays cheap (no torch, no pandas)."""
from __future__ import annotations

import contextlib
import logging
import os
import threading
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterable, Iterator

if TYPE_CHECKING:  # pragma: no cover
    import pandas as pd
    from omegaconf import DictConfig

__all__ = ["compose", "run", "load", "collect", "Result"]

log = logging.getLogger(__name__)

CONFIG_MODULE = "bdexp.conf"
CONFIG_NAME = "config"
# What a run's record tags mean for `Result.metric`: every key of a record but these two.
_VALUE_KEYS = ("metric", "value")
# One compose or run at a time per process: Hydra's compose API keeps process-wide singletons, and a
# run seeds torch's and numpy's global generators and sets torch's thread count. Calls from several
# threads are served one after the other (each gets the result it would get alone).
_ONE_AT_A_TIME = threading.RLock()


@contextlib.contextmanager
def _serialized(what: str) -> Iterator[None]:
    if not _ONE_AT_A_TIME.acquire(blocking=False):
        log.info("%s waits for the bdexp call running in another thread (one at a time per process)", what)
        _ONE_AT_A_TIME.acquire()
    try:
        yield
    finally:
        _ONE_AT_A_TIME.release()


@contextlib.contextmanager
def _own_hydra() -> Iterator[None]:
    """Hydra's compose API initialized on bdexp's config tree for the block, whatever Hydra state
    the caller has: an app already running under @hydra.main (or an earlier `initialize`) gets its
    own state back untouched afterwards, and with none the global state is left clear again.
    Hydra's `initialize_*` refuse to run over an initialized GlobalHydra, restore only the
    GlobalHydra they found (hydra/initialize.py: get_gh_backup, restore_gh_from_backup), and set
    two more process-wide singletons, the job name and the version base (hydra/_internal/hydra.py,
    hydra/version.py), which a sweep still running in this process reads for its next jobs. So the
    caller's three are set aside here rather than cleared (clearing would break the app holding
    them) and put back after."""
    from hydra import initialize_config_module
    from hydra.core.global_hydra import GlobalHydra
    from hydra.core.singleton import Singleton
    from hydra.core.utils import JobRuntime
    from hydra.version import VersionBase

    kept = {cls: Singleton._instances.pop(cls, None) for cls in (GlobalHydra, JobRuntime, VersionBase)}
    try:
        with initialize_config_module(config_module=CONFIG_MODULE, version_base="1.3"):
            yield
    finally:
        for cls, previous in kept.items():
            Singleton._instances.pop(cls, None)
            if previous is not None:
                Singleton._instances[cls] = previous


def _override_list(overrides: str | Iterable[str] | None) -> list[str]:
    """Overrides as a list of 'key=value' strings; a ConfigError for anything else (a number, a
    mapping: a dict's keys are not overrides)."""
    from bdexp.errors import ConfigError

    if overrides is None:
        return []
    if isinstance(overrides, str):  # one override, not its characters
        return [overrides]
    if isinstance(overrides, (Mapping, bytes)) or not isinstance(overrides, Iterable):
        raise ConfigError(f"expected a list of overrides ('key=value' strings) or a config from bdexp.compose(), "
                          f"not {type(overrides).__name__} {overrides!r:.80}")
    wanted = list(overrides)
    odd = [o for o in wanted if not isinstance(o, str)]
    if odd:
        raise ConfigError(f"an override is a 'key=value' string, not {type(odd[0]).__name__} {odd[0]!r:.80}")
    return wanted


def _compose(overrides: str | Iterable[str] | None) -> tuple[DictConfig, str | None, bool]:
    """(the job config, the run directory Hydra would use, whether that directory is the dated
    default). Composition errors and invalid values raise ConfigError naming the key."""
    from hydra import compose as hydra_compose
    from hydra.errors import HydraException
    from omegaconf import OmegaConf, open_dict
    from omegaconf.errors import OmegaConfBaseException

    from bdexp.cli import check_override_digits, hydra_message
    from bdexp.errors import ConfigError
    from bdexp.validation import validate_config

    wanted = _override_list(overrides)
    check_override_digits(wanted)
    try:
        with _serialized("bdexp.compose"), _own_hydra():
            cfg = hydra_compose(config_name=CONFIG_NAME, overrides=wanted, return_hydra_config=True)
            raw_dir = OmegaConf.select(cfg, "hydra.run.dir", throw_on_resolution_failure=False)
            template = OmegaConf.to_container(cfg.hydra.run, resolve=False).get("dir")
            run_dir = None if raw_dir is None else str(raw_dir)
            dated = isinstance(template, str) and "${now:" in template
            with open_dict(cfg):  # the task function's config: Hydra's own node is not part of it
                del cfg["hydra"]
    except (HydraException, OmegaConfBaseException) as err:
        message = hydra_message(err) or str(err)
        if any("," in o.partition("=")[2] and not o.partition("=")[2].startswith(("[", "{")) for o in wanted):
            message += " (bdexp.run runs one config: loop over bdexp.run, or sweep with `bdexp -m`)"
        raise ConfigError(message) from err
    validate_config(cfg)
    return cfg, run_dir, dated


def compose(overrides: str | Iterable[str] | None = None) -> DictConfig:
    """The config `bdexp <overrides>` runs: the same defaults, presets (`experiment=...`), scales
    and checks. An unknown key or option, bad override syntax or a value of the wrong type or range
    raises `bdexp.errors.ConfigError` naming the key (bdexp/validation.py). Hydra's own node
    (`hydra.run.dir`, ...) is not part of it, as in the CLI's task config; `run(run_dir=...)` says
    where a run goes. Safe to call repeatedly, and from inside a running Hydra app."""
    return _compose(overrides)[0]


def _fresh_dir(path: Path) -> Path:
    """`path`, or `path-1`, `path-2`, ... when a run in the same second (another call, another
    process) already took it; created here, so two callers never share one."""
    candidate, n = path, 0
    while True:
        try:
            candidate.mkdir(parents=True, exist_ok=False)
            return candidate
        except FileExistsError:
            n += 1
            candidate = path.with_name(f"{path.name}-{n}")


def _default_run_dir() -> Path:
    from datetime import datetime

    now = datetime.now()
    return Path("outputs/runs") / now.strftime("%Y-%m-%d") / now.strftime("%H-%M-%S")


def run(config: DictConfig | str | Iterable[str] | None = None, run_dir: str | os.PathLike | None = None,
        *, rerun: bool = False) -> Result:
    """Run one experiment as `bdexp` does and return its `Result`.

    `config` is a list of overrides (composed with `compose`) or a config `compose` returned
    (possibly edited). `run_dir` is where results.json goes; None gives a new
    `outputs/runs/<date>/<time>` under the current directory, as the CLI does (a `-1`, `-2`, ...
    suffix when a run in the same second has it; an override `hydra.run.dir=...` is honoured).

    As in the CLI, a run directory that already holds complete results for the same config is
    not computed again (its results are returned; `rerun=True` computes them anyway), a failure
    leaves a results.json with status "failed", and an interrupted run (Ctrl-C) keeps what it
    finished in results.json, so a call with the same config and `run_dir` resumes it. A `run_dir`
    holding complete results of another config is refused (ConfigError): pass another one.
    `threads` sets torch's CPU threads for the process. Calls from several threads run one after
    the other, each with the result it would get alone. Anything but overrides or a config (a
    number, a dict), or a config without a dataset, model, attack or train node, raises ConfigError."""
    with _serialized("bdexp.run"):
        return _run_one(config, run_dir, rerun)


def _run_one(config, run_dir, rerun: bool) -> Result:
    import copy
    import signal

    from omegaconf import DictConfig, open_dict

    from bdexp.validation import validate_config

    dated = True
    if isinstance(config, DictConfig):
        cfg = copy.deepcopy(config)  # the caller's config stays as it was
        if "hydra" in cfg:
            with open_dict(cfg):
                del cfg["hydra"]
        validate_config(cfg)
        hydra_dir = None
    else:
        cfg, hydra_dir, dated = _compose(config)
    if run_dir is not None:
        target = Path(run_dir)
    elif hydra_dir is not None and not dated:
        target = Path(hydra_dir)
    else:
        target = _fresh_dir(Path(hydra_dir) if hydra_dir is not None else _default_run_dir())

    import torch

    from bdexp import jobs, pipeline
    from bdexp.cli import record_failure
    from bdexp.errors import BdexpError, ConfigError
    from bdexp.validation import check_run

    try:  # before any work, as the CLI: writable run and cache directories
        check_run(cfg, target, "run_dir")
    except BdexpError as err:
        record_failure(target, cfg, None, err, keep_existing=True)
        raise
    digest = jobs.config_hash(cfg)
    if not rerun and jobs.completed(target, digest):
        log.info("%s already holds complete results for this config (hash %s); pass rerun=True to "
                 "compute them again", target, digest)
        return Result.read(target)
    in_the_way = jobs.results_in_the_way(target, digest)
    if in_the_way is not None and in_the_way[0].startswith("complete"):
        raise ConfigError(f"{target} already holds {in_the_way[0]}; this config (hash {digest}) would replace "
                          f"them: pass another run_dir, or move {target / 'results.json'} away to replace them")
    if in_the_way is not None:  # an edited results.json: kept beside the new one
        jobs.set_aside_results(target, *in_the_way)
    if cfg.get("threads") is not None:
        torch.set_num_threads(int(cfg.threads))
    try:
        with jobs.interruptible():
            pipeline.run(cfg, target, config_hash=digest)
    except jobs.Interrupted as err:
        if err.signum == signal.SIGINT:  # what a script or notebook expects from Ctrl-C
            raise KeyboardInterrupt(f"interrupted during {err.where or 'startup'}; what finished is in "
                                    f"{target / 'results.json'}; run the same config there to resume") from err
        raise
    except Exception as err:
        record_failure(target, cfg, digest, err)
        raise
    return Result.read(target)


def _results_file(path: str | os.PathLike) -> Path:
    """The results.json of a run directory, or `path` itself when it is a file, once it reads as
    one bdexp wrote (report.collect.read_run). A missing file raises FileNotFoundError, any other
    file report.collect.ResultsFileError (a BdexpError and a ValueError) naming it and why."""
    from bdexp.report.collect import ResultsFileError, read_run
    from bdexp.results import RESULTS_FILE

    path = Path(path)
    if path.is_dir() and (path / RESULTS_FILE).is_file():
        path = path / RESULTS_FILE
    elif not path.is_file():
        hint = f"; for a sweep use bdexp.collect({str(path)!r})" if path.is_dir() else ""
        raise FileNotFoundError(f"no {RESULTS_FILE} at {path} (give a run directory or its {RESULTS_FILE}){hint}")
    problem = read_run(path)[1]
    if problem is not None:
        raise ResultsFileError(f"{path} is not a bdexp {RESULTS_FILE}: {problem}")
    return path


def load(path: str | os.PathLike) -> pd.DataFrame:
    """The records of one run (its directory or its results.json) as the long-format DataFrame
    `bdexp-report` builds: one row per metric record, with the run's identity as columns. A path
    with no results.json raises FileNotFoundError; a file that is not a results.json bdexp wrote
    (not JSON, or another JSON) raises ValueError (report.collect.ResultsFileError, also a
    BdexpError) naming the file and why. An interrupted run gives an empty frame (its re-run holds
    the records)."""
    from bdexp.report.collect import collect as collect_frame

    return collect_frame(_results_file(path))


def collect(root: str | os.PathLike) -> pd.DataFrame:
    """Every results.json under `root` (a sweep's `outputs/multirun/<date>/<time>`, or any folder
    of runs) as the one DataFrame `bdexp-report` builds from it (bdexp/report/collect.py). A
    results.json that cannot be used (unreadable, or not shaped as bdexp writes it) is skipped with
    a warning naming it and why, as `bdexp-report` does; the others are read. `root` missing, or a
    folder with no results.json anywhere under it, raises FileNotFoundError; a folder whose
    results.json are all skipped or hold no records (failed runs) gives an empty frame. `root` may
    also be one results.json, read as `load` reads it."""
    from bdexp.report.collect import collect as collect_frame, find_results
    from bdexp.results import RESULTS_FILE

    root = Path(root)
    if not root.exists():
        raise FileNotFoundError(f"{root} does not exist")
    if root.is_file():
        return load(root)
    if not find_results(root):
        raise FileNotFoundError(f"no {RESULTS_FILE} under {root}; point bdexp.collect at a run or sweep directory "
                                "(e.g. outputs/multirun/<date>/<time>)")
    return collect_frame(root)


@dataclass(repr=False)
class Result:
    """One run's results: `run` (the run object of results.json: identity, config, device, wall
    time, ...), `records` (the long-format DataFrame `bdexp-report` builds for it), `run_dir`,
    `metrics` (the raw records) and `status`. `metric(name, **tags)` picks one value."""

    run: dict
    records: pd.DataFrame
    run_dir: Path
    metrics: list[dict] = field(default_factory=list)
    status: str = "complete"

    @classmethod
    def read(cls, run_dir: str | os.PathLike) -> Result:
        from bdexp.results import read_results

        path = _results_file(run_dir)
        payload = read_results(path)
        return cls(run=payload.get("run", {}), records=load(path), run_dir=path.parent,
                   metrics=list(payload.get("metrics", [])), status=payload.get("status", "complete"))

    def metric(self, name: str, default: Any = KeyError, **tags: Any) -> float | None:
        """The value of the record `name` whose tags match `tags` (`metric("f1", defense="ac",
        level="s3", N=100, r=0.1)`: the screening pool's size N and ratio r′, as records tag them,
        docs/metrics.md). Among several matches, the one with no tags beyond
        those given (the run's own BA/ASR rather than a defense's); a choice still open raises
        ValueError naming the tags that tell the matches apart. A missing record raises KeyError,
        or returns `default` when one is given."""
        found = [r for r in self.metrics if r.get("metric") == name
                 and all(k in r and r[k] == v for k, v in tags.items())]
        if found:
            extra = [set(r) - set(_VALUE_KEYS) - set(tags) for r in found]
            fewest = min(len(e) for e in extra)
            best = [r for r, e in zip(found, extra) if len(e) == fewest]
            if len(best) == 1:
                return best[0]["value"]
            differ = sorted({k for r in best for k in r if k not in _VALUE_KEYS and k not in tags
                             and len({repr(b.get(k)) for b in best}) > 1})
            raise ValueError(f"{len(best)} records {name!r} match {tags or 'no tags'}; choose with "
                             f"{', '.join(differ)}")
        if default is not KeyError:
            return default
        have = sorted({str(r.get("metric")) for r in self.metrics})
        raise KeyError(f"no record {name!r} with {tags or 'no tags'} in {self.run_dir}; metrics: {', '.join(have)}")

    def summary(self) -> str:
        """`digits · convnet · blended · standard: BA 0.981, ASR 1.000`."""
        run = self.run
        train = str(run.get("train"))
        if run.get("regime") not in (None, run.get("train")):
            train += f" ({run['regime']})"
        case = " · ".join([str(run.get("dataset")), str(run.get("model")), str(run.get("attack")), train])
        values = [f"{label} {v:.3f}" for label, key in (("BA", "ba"), ("ASR", "asr"))
                  if isinstance(v := self.metric(key, default=None), (int, float))]
        status = "" if self.status == "complete" else f" [{self.status}]"
        return f"{case}: {', '.join(values) or 'no BA/ASR'}{status}"

    def __repr__(self) -> str:
        return f"<bdexp.Result {self.summary()}; {len(self.metrics)} records in {self.run_dir}>"

    def __str__(self) -> str:
        return self.summary()
