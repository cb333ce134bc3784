"""Checks on the composed config and the output directories, run before any work (issue 13:
"every bad input gets one clear line"), so `train.epochs=abc` or a `cache.dir` that is a file
stops at once with a message naming the key, the value and what is allowed, instead of a
traceback minutes into a run.

Two layers:
- `RULES`: the keys every run reads, with their type and range (a declarative table).
- Every other number, flag or list of numbers in a selected group (defense.*, analysis.*,
  train.*, dataset.*, model.*, attack.*) must keep the kind its YAML default in conf/ has:
  `defense.nc.steps=abc` is refused because defense/nc.yaml sets `steps: 300`. Ranges of those
  keys are checked by the method that reads them.
"""
from __future__ import annotations

import errno
import math
import os
import tempfile
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

from omegaconf import DictConfig, ListConfig, OmegaConf

from bdexp.errors import ConfigError

from bdexp.options import CONF_DIR, _num, show


@dataclass(frozen=True)
class Rule:
    """`kind`: int | number | bool | ints | numbers (a non-empty list) | choice (one of `choices`,
    e.g. a rule's name); `lo`/`hi` bound every number (open bounds with lo_open/hi_open); `null`:
    None is allowed; `choices`: exact values."""

    kind: str
    lo: float | None = None
    hi: float | None = None
    lo_open: bool = False
    hi_open: bool = False
    null: bool = False
    choices: tuple | None = None

    def describe(self) -> str:
        if self.kind == "bool":
            text = "true or false"
        elif self.choices is not None:
            text = "one of " + ", ".join(map(str, self.choices))
        else:
            noun = {"int": "an integer", "number": "a number", "ints": "a non-empty list of integers",
                    "numbers": "a non-empty list of numbers"}[self.kind]
            bounds = []
            if self.lo is not None:
                bounds.append(f"{'>' if self.lo_open else '>='} {_num(self.lo)}")
            if self.hi is not None:
                bounds.append(f"{'<' if self.hi_open else '<='} {_num(self.hi)}")
            each = " each" if self.kind in ("ints", "numbers") and bounds else ""
            text = noun + (each + " " + " and ".join(bounds) if bounds else "")
        return text + (", or null" if self.null else "")

    def _scalar_ok(self, v, integer: bool) -> bool:
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
            return False
        if integer and not float(v).is_integer():
            return False
        if self.choices is not None and v not in self.choices:
            return False
        if self.lo is not None and (v <= self.lo if self.lo_open else v < self.lo):
            return False
        return self.hi is None or (v < self.hi if self.hi_open else v <= self.hi)

    def ok(self, v) -> bool:
        if v is None:
            return self.null
        if self.kind == "bool":
            return isinstance(v, bool)
        if self.kind == "choice":
            return v in self.choices
        if self.kind in ("int", "number"):
            return self._scalar_ok(v, self.kind == "int")
        if not isinstance(v, (list, tuple)) or not v:
            return False
        return all(self._scalar_ok(x, self.kind == "ints") for x in v)


_INT_1 = Rule("int", 1)
_LIMIT = Rule("int", 1, null=True)
_BOOL = Rule("bool")

# Keys every run (or the method that owns them) reads; a key absent from the composed config
# (another dataset's or regime's) is not checked.
RULES: dict[str, Rule] = {
    "seed": Rule("int", 0, 2**32 - 1),           # numpy's seed range
    "eval_batch_size": _INT_1,
    "threads": _LIMIT,
    "checkpoint_every": Rule("int", 0),          # 0 = never
    "progress": _BOOL,
    "sanitizer_reference_epochs": Rule("number", 0, lo_open=True),
    "cache.enabled": _BOOL,
    "screening.sizes": Rule("ints", 1),
    "screening.ratios": Rule("numbers", 0, lo_open=True),
    "screening.reserve_per_class": Rule("int", 0),
    "train.epochs": _INT_1,
    "train.batch_size": _INT_1,
    "train.lr": Rule("number", 0, lo_open=True),
    "train.momentum": Rule("number", 0, 1),
    "train.weight_decay": Rule("number", 0),
    "train.nesterov": _BOOL,
    "train.milestones": Rule("numbers", 0, 1),   # fractions of train.epochs (training/loop.py)
    "train.gamma": Rule("number", 0, lo_open=True),
    "train.amp": _BOOL,
    "train.compile": _BOOL,
    "train.log_every": _INT_1,
    "train.mmd_weight": Rule("number", 0),
    "train.epsilon": Rule("number", 0),
    "train.step_size": Rule("number", 0, lo_open=True),
    "train.steps": Rule("int", 0),
    "dataset.image_size": Rule("int", 8),        # digits' native 8 px is the smallest preset
    "dataset.channels": Rule("int", choices=(1, 3)),
    "dataset.train_limit": _LIMIT,
    "dataset.test_limit": _LIMIT,
    "dataset.train_size": _INT_1,
    "dataset.test_size": _INT_1,
    "dataset.num_classes": Rule("int", 2),       # a backdoor needs a target and another class
    "dataset.split_seed": Rule("int", 0, 2**32 - 1),
    "dataset.test_fraction": Rule("number", 0, 1, lo_open=True, hi_open=True),
    "dataset.noise": Rule("number", 0),
    "dataset.prototype_grid": _INT_1,
    "dataset.augment.crop_padding": Rule("int", 0),
    "dataset.augment.flip": _BOOL,
    "dataset.download": _BOOL,
    "model.width": Rule("number", 0, lo_open=True),
    # the decision rules of the pool detectors and ISPL's schedules (bdexp/defenses/ac.py, ss.py,
    # ispl_core.py): a misspelt rule stops here, not after training
    "defense.ac.criterion": Rule("choice", choices=("reserve", "size", "silhouette")),
    "defense.ac.reduce": Rule("choice", choices=("fastica", "pca")),
    "defense.ac_train.criterion": Rule("choice", choices=("size", "silhouette")),
    "defense.ac_train.reduce": Rule("choice", choices=("fastica", "pca")),
    "defense.ss.orient": Rule("choice", choices=("reserve", "none")),
    "defense.ispl.vote_rule": Rule("choice", choices=("paper", "code")),
    "defense.ispl.st_smooth": Rule("choice", choices=("probs", "agreement")),
    "defense.ispl.iter_schedule": Rule("choice", choices=("constant", "step")),
    "defense.ispl.learner_schedule": Rule("choice", choices=("constant", "step")),
    "defense.ispl.st_schedule": Rule("choice", choices=("constant", "step")),
    "defense.itlm.round_schedule": Rule("choice", choices=("constant", "step")),
    # the overlap bound's ball norm (OVL evaluates ℓ1, ℓ2 and ℓ∞; `inf` on the command line)
    "defense.overlap.norm": Rule("choice", choices=(1, 2, math.inf, "inf")),
}

_GENERIC = {"number": Rule("number", null=True), "bool": Rule("bool", null=True),
            "numbers": Rule("numbers", null=True)}


def _kind(value) -> str | None:
    if isinstance(value, bool):
        return "bool"
    if isinstance(value, (int, float)):
        return "number"
    if isinstance(value, list) and value and all(_kind(x) == "number" for x in value):
        return "numbers"
    return "other" if value is not None else None


def _walk(prefix: str, node, out: dict[str, str | None]) -> None:
    if not isinstance(node, dict):
        return
    for key, value in node.items():
        full = f"{prefix}.{key}" if prefix else str(key)
        if isinstance(value, dict):
            _walk(full, value, out)
            continue
        kind = _kind(value)
        if kind is None:
            continue
        seen = out.setdefault(full, kind)
        if seen != kind:  # a number in one file, a string in another: no kind to hold it to
            out[full] = "other"


@lru_cache(maxsize=1)
def declared_kinds() -> dict[str, str]:
    """dotted key -> number | bool | numbers, from the YAML defaults of every group option."""
    out: dict[str, str | None] = {}
    for group in ("defense", "analysis"):  # one file per entry, its keys under its own name
        for path in sorted((CONF_DIR / group).glob("*.yaml")):
            _walk(group, OmegaConf.to_container(OmegaConf.load(path), resolve=False), out)
    for group in ("train", "dataset", "model", "attack"):  # one entry: the union over the options
        for path in sorted((CONF_DIR / group).glob("*.yaml")):
            raw = OmegaConf.to_container(OmegaConf.load(path), resolve=False)
            raw.pop("defaults", None)
            _walk(group, raw, out)
    return {k: v for k, v in out.items() if v in _GENERIC}


def one_line(text) -> str:
    """An omegaconf or Hydra message on one line, without its `full_key:`/`object_type=` trailer."""
    lines = [line.strip() for line in str(text).splitlines()]
    return " ".join(line for line in lines
                    if line and not line.startswith(("full_key:", "object_type=", "reference_type=")))


_ABSENT = object()


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


def declared_problems(cfg: DictConfig) -> tuple[list[str], tuple[str, ...]]:
    """Problems of every selected method's node against its Options declaration, and the dotted
    keys (with a trailing dot) those declarations cover."""
    problems, covered = [], []
    for where, registry, node in method_nodes(cfg):
        name = str(node.name)
        if name not in registry:
            problems.append(f"{where}.name={name!r} is not a {registry.kind}; choose one of {', '.join(registry.names())}")
            continue
        options = registry.options(name)
        if options is None:  # not declared yet: the generic kind check below covers it
            continue
        covered.append(where + ".")
        problems += options.problems(node, where)
    return problems, tuple(covered)


def validate_config(cfg: DictConfig) -> None:
    """Raise ConfigError naming every key whose value has the wrong type or range, or an
    interpolation that does not resolve."""
    try:
        OmegaConf.to_container(cfg, resolve=True)
    except Exception as err:  # omegaconf's InterpolationKeyError, UnsupportedInterpolationType, ...
        raise ConfigError(f"the config does not resolve: {one_line(err)}") from None
    problems, declared = declared_problems(cfg)
    rules = {k: _GENERIC[v] for k, v in declared_kinds().items() if not k.startswith(declared)}
    rules.update({k: r for k, r in RULES.items() if not k.startswith(declared)})
    for key, rule in rules.items():
        value = OmegaConf.select(cfg, key, default=_ABSENT)
        if value is _ABSENT:
            continue
        if isinstance(value, (DictConfig, ListConfig)):
            value = OmegaConf.to_container(value, resolve=True)
        if not rule.ok(value):
            problems.append(f"{key}={show(value)} is not allowed: use {rule.describe()}")
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
