"""Checks on the composed config and the output directories, run before any work (every bad input
gets one clear line), so `train.epochs=abc` or a `cache.dir` that is a file
stops at once with a message naming the key, the value and what is allowed, instead of a
traceback minutes into a run.

Every value is checked against a declaration (bdexp/options.py): the run's own keys against
`RunOptions` below, each selected method's node (dataset, model, attack, train, every defense
and analysis) against the Options its registry holds. A wrong type, a value out of range or an
unknown key is one line naming the key and what is allowed.
"""
from __future__ import annotations

import errno
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from bdexp.errors import ConfigError
from bdexp.models.base import Level
from bdexp.objective import ObjectiveOptions
from bdexp.options import Options, option


@dataclass(frozen=True)
class ScreeningOptions(Options):
    """The test-time screening protocol of ML-MMDR §6.1 (conf/config.yaml explains each value)."""

    sizes: tuple[int, ...] = option([100, 500], lo=1, nonempty=True)  # N
    ratios: tuple[float, ...] = option([0.1, 1.0], lo=0, lo_open=True, nonempty=True)  # r′
    levels: tuple[Level, ...] = option(["s1", "s2", "s3"], nonempty=True)
    reserve_per_class: int = option(200, lo=0)


@dataclass(frozen=True)
class CacheOptions(Options):
    enabled: bool = True
    dir: str = "outputs/cache"  # conf/config.yaml: ${oc.env:BDEXP_CACHE_DIR,outputs/cache}


@dataclass(frozen=True)
class RunOptions(Options):
    """The keys of conf/config.yaml every run reads (the methods' own keys are their declarations)."""

    seed: int = option(0, lo=0, hi=2**32 - 1)  # numpy's seed range
    device: str = "auto"  # auto | cpu | cuda | cuda:N (pipeline.resolve_device)
    eval_batch_size: int = option(512, lo=1)
    threads: int | None = option(None, lo=1)
    checkpoint_every: int = option(1, lo=0)  # 0 = never
    progress: bool = True
    # the schedule length the sanitizers' paper epochs assume (defenses/ispl.py; scale=cpu: 40)
    sanitizer_reference_epochs: float = option(100, lo=0, lo_open=True)
    screening: ScreeningOptions = option(ScreeningOptions())
    cache: CacheOptions = option(CacheOptions())
    objective: ObjectiveOptions | None = None  # the number a sweep optimises (bdexp/objective.py)


# The config groups a run selects methods from: the four every run needs, and the two lists.
REQUIRED_GROUPS = ("dataset", "model", "attack", "train")
LIST_GROUPS = ("defense", "analysis")
# Top-level keys the config tree sets besides RunOptions and the groups: the scale a run was composed
# at (conf/scale/*.yaml) and the scale an experiment preset brings with it (conf/experiment/rgb_*.yaml).
PRESET_KEYS = ("scale_name", "own_scale", "own_reference_epochs")


def top_level_problems(cfg: DictConfig) -> list[str]:
    """An unknown top-level key (`+trian.epochs=5`, the fix Hydra's own message suggests for a
    misspelt key, would otherwise be accepted and ignored) and a missing method group."""
    known = set(RunOptions.fields()) | set(REQUIRED_GROUPS) | set(LIST_GROUPS) | set(PRESET_KEYS)
    problems = []
    unknown = sorted(str(k) for k in cfg.keys() if k not in known)
    if unknown:
        problems.append(f"unknown top-level key(s) {', '.join(unknown)}: bdexp reads none of them; allowed: "
                        f"{', '.join(sorted(known - set(PRESET_KEYS)))} (bdexp --help lists the groups and keys)")
    for group in REQUIRED_GROUPS:
        node = cfg.get(group)
        if not isinstance(node, DictConfig) or node.get("name") is None:
            problems.append(f"the config has no {group} (a `{group}` node with a `name`): compose it with "
                            f"bdexp.compose([...]) or pick one with {group}=<name>")
    return problems


def unselected_entry_problems(cfg: DictConfig) -> list[str]:
    """A `defense.<key>` / `analysis.<key>` block without a `name` holds settings for a method the run
    did not select (a preset's defense.ac.n_components, say; the run skips it with a warning): fine
    when <key> names a registered method, a misspelling (`defense.acc.n_components=20`) when not."""
    from bdexp.analysis import ANALYSES
    from bdexp.defenses import DEFENSES

    from bdexp.options import CONF_DIR

    problems = []
    for group, registry in (("defense", DEFENSES), ("analysis", ANALYSES)):
        # a selection is a YAML of conf/<group>/ (cd_probs is a variant of cd) or a registered name
        choices = sorted({*registry.names(), *(p.stem for p in (CONF_DIR / group).glob("[!_]*.yaml"))})
        node = cfg.get(group)
        for key, entry in (node.items() if isinstance(node, DictConfig) else []):
            if isinstance(entry, DictConfig) and entry.get("name") is None and str(key) not in choices:
                problems.append(f"{group}.{key} names no {registry.kind}: choose one of {', '.join(choices)}")
    return problems


def one_line(text) -> str:
    """An omegaconf or Hydra message on one line, without its `full_key:`/`object_type=` trailer."""
    lines = [line.strip() for line in str(text).splitlines()]
    return " ".join(line for line in lines
                    if line and not line.startswith(("full_key:", "object_type=", "reference_type=")))


def method_nodes(cfg: DictConfig):
    """(dotted key, registry, config node) of every method the run selects: the dataset, model,
    attack and training regime, and each entry of `defense` and `analysis`."""
    from bdexp.analysis import ANALYSES
    from bdexp.attacks import ATTACKS
    from bdexp.data import DATASETS
    from bdexp.defenses import DEFENSES
    from bdexp.models import MODELS
    from bdexp.training import REGIMES

    for key, registry in (("dataset", DATASETS), ("model", MODELS), ("attack", ATTACKS), ("train", REGIMES)):
        node = cfg.get(key)
        if isinstance(node, DictConfig) and node.get("name") is not None:
            yield key, registry, node
    for group, registry in (("defense", DEFENSES), ("analysis", ANALYSES)):
        for entry, node in (cfg.get(group) or {}).items():
            if isinstance(node, DictConfig) and node.get("name") is not None:
                yield f"{group}.{entry}", registry, node


def declared_problems(cfg: DictConfig) -> list[str]:
    """Problems of every selected method's node against its Options declaration."""
    problems = []
    for where, registry, node in method_nodes(cfg):
        name = str(node.name)
        if name not in registry:
            problems.append(f"{where}.name={name!r} is not a {registry.kind}; choose one of {', '.join(registry.names())}")
            continue
        problems += registry.options(name).problems(node, where)
    return problems


def validate_config(cfg: DictConfig) -> None:
    """Raise ConfigError naming every key whose value has the wrong type or range, or an
    interpolation that does not resolve."""
    try:
        OmegaConf.to_container(cfg, resolve=True)
    except Exception as err:  # omegaconf's InterpolationKeyError, UnsupportedInterpolationType, ...
        raise ConfigError(f"the config does not resolve: {one_line(err)}") from None
    run_keys = {k: OmegaConf.to_container(cfg[k], resolve=True) if OmegaConf.is_config(cfg[k]) else cfg[k]
                for k in RunOptions.fields() if k in cfg}
    problems = top_level_problems(cfg)
    problems += [p.removeprefix("run.") for p in RunOptions.problems(run_keys, "run")]
    problems += unselected_entry_problems(cfg)
    problems += declared_problems(cfg)
    own = cfg.get("own_scale")
    if own and cfg.get("scale_name") != own:
        # scale/*.yaml merges after the experiment preset, so it would silently undo the preset's epochs
        problems.append(f"scale={cfg.get('scale_name')} cannot be combined with a preset that sets its own scale "
                        f"({own}: its data, epochs and schedule); drop scale=..., or set train.epochs etc. yourself")
    if problems:
        raise ConfigError("; ".join(problems))


def probe_writable(path: str | os.PathLike, what: str, key: str) -> None:
    """Create `path` (a directory) and write, fsync and remove a small file in it; a ConfigError
    names `what`, the path and the reason (read-only, a file in the way, a full disk)."""
    path = Path(path).expanduser()
    try:
        if path.exists() and not path.is_dir():
            raise ConfigError(f"{what} {path} is a file, not a directory; point {key} at a directory")
        path.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(dir=path, prefix=".bdexp-write-probe-")
        try:
            os.write(fd, b"0" * 4096)
            os.fsync(fd)
        finally:
            os.close(fd)
            os.unlink(probe)
    except OSError as err:
        reason = "the disk is full" if err.errno in (errno.ENOSPC, errno.EDQUOT) else (err.strerror or str(err))
        raise ConfigError(f"cannot write {what} {path}: {reason} ({err.filename or path}); "
                          f"point {key} somewhere writable") from None


def check_run(cfg: DictConfig, run_dir: str | os.PathLike | None, run_dir_key: str = "hydra.run.dir") -> None:
    """Everything checked before a run starts: the config's values, then that the run directory
    (and the cache directory, when the cache is on) can be written."""
    validate_config(cfg)
    if run_dir is not None:
        probe_writable(run_dir, "the run directory", run_dir_key)
    if cfg.cache.enabled:
        probe_writable(cfg.cache.dir, "the cache directory", "cache.dir")
