"""A sweep objective: one number chosen in the config, which the CLI returns from its
task function so that Hydra's sweepers (Optuna: `hydra/sweeper=optuna`) can search over runs.

    objective:                       # conf/config.yaml: null (off)
      metric: f1                     # records with this metric ...
      where: {defense: ac, level: s3}  # ... and these tags (docs below)
      agg: mean                      # mean | min | max | median of their values
      direction: minimize            # as hydra.sweeper.direction; sets the default penalty
      constraints:                   # optional: a violated one makes the objective `penalty`
        - {metric: asr, min: 0.9, where: {defense: null}}
      penalty: null                  # null: +inf when minimizing, -inf when maximizing

`objective.where` filters on a run's long-format records (bdexp/results.py `record`): every key
is a tag and a record matches when its tag equals the value (numbers compare as numbers, so
`r: 1` matches r′ = 1.0; true/false only match booleans); a list matches any of its values
(`level: [s2, s3]`); null matches records *without* that tag (`defense: null` is the run's own
BA/ASR, not a sanitizer's retrained model or NC's pruning curve). A record whose value is not
finite (results.json stores it as null) is left out of the aggregate with a warning.

What happens when the objective cannot be computed:
- **no record matches** (the objective's or a constraint's filter): a ConfigError naming the
  filter and the metrics (and, for the metric, the tag values) the run has. It is raised at the
  end of the run, after results.json is written, so the run's work is kept (a re-run finds the
  complete results and only recomputes the objective). We raise instead of returning NaN because
  a filter that matches nothing is a typo in the config, the same in every trial: NaN would mark
  each trial failed one after another and a 50-trial search would burn its budget before the
  researcher sees why. Raised from the task function, it stops the Optuna sweeper at the first
  trial (its default `max_failure_rate` is 0) and the CLI prints the one line.
- **records match but none has a finite value** (an undefined F1 on a degenerate pool): a fact of
  this trial, not of the config. `objective_value` returns NaN; `run_objective` logs a warning and
  returns None, which Hydra's Optuna sweeper records as a failed trial and goes on. (It does not
  return NaN: with optuna 2.10, hydra-optuna-sweeper 1.3 tells a NaN value twice, the second time
  with state FAIL, and that ValueError ends the whole sweep.)

Constraints (the issue's "keep ASR >= 0.9 while minimizing detector F1"): each constraint is an
aggregate of its own records (`metric`, `where`, `agg`, as above; its `where` is not inherited
from the objective's, as ASR records carry no defense or level tags) that must lie in
[`min`, `max`]. When one is violated the objective is `penalty` instead of its value: by default
the worst value there is for the direction (+inf when minimizing), so an infeasible trial never
beats a feasible one. A finite penalty (e.g. 1.0 for an F1 being minimized, F1's worst) keeps the
sampler's model of the objective bounded; it then ties with the worst feasible trials.
"""
from __future__ import annotations

import logging
import math
import statistics
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from bdexp.errors import ConfigError
from bdexp.options import Options, _plain, option, show

log = logging.getLogger(__name__)

Agg = Literal["mean", "min", "max", "median"]
AGGREGATES = {"mean": statistics.fmean, "min": min, "max": max, "median": statistics.median}
# Keys of a record that are not tags: a filter on them is a mistake (`metric` has its own key).
RECORD_KEYS = ("metric", "value")


def _where_problems(where_node, where: str) -> list[str]:
    if not isinstance(where_node, Mapping):
        return []  # the type check of Options.problems reports it
    bad = [k for k in where_node if k in RECORD_KEYS]
    return [f"{where}.where may not filter on {', '.join(bad)}: the metric is {where}.metric"] if bad else []


@dataclass(frozen=True)
class ConstraintOptions(Options):
    """One constraint of an objective: `agg` of the records with `metric` and tags `where` must lie
    in [min, max] (either bound may be null, not both)."""

    metric: str = ""
    where: dict[str, Any] = option({})
    agg: Agg = "mean"
    min: float | None = None
    max: float | None = None

    @classmethod
    def problems(cls, node, where: str) -> list[str]:
        raw = _plain(node)
        out = super().problems(raw, where)
        if out:
            return out
        if not raw.get("metric"):
            out.append(f"{where}.metric is required: the metric of the records it bounds (e.g. asr)")
        lo, hi = raw.get("min"), raw.get("max")
        if lo is None and hi is None:
            out.append(f"{where}: set min, max or both (e.g. min: 0.9)")
        elif lo is not None and hi is not None and lo > hi:
            out.append(f"{where}: min={show(lo)} is above max={show(hi)}")
        return out + _where_problems(raw.get("where"), where)

    @classmethod
    def parse(cls, node=None, where: str | None = None) -> "ConstraintOptions":
        return super().parse(node, where or "objective.constraints")

    def describe(self) -> str:
        bounds = " and ".join(b for b in (f">= {self.min:g}" if self.min is not None else "",
                                          f"<= {self.max:g}" if self.max is not None else "") if b)
        return f"{_describe(self.metric, self.where, self.agg)} {bounds}"


@dataclass(frozen=True)
class ObjectiveOptions(Options):
    """The `objective` block of conf/config.yaml (module docstring)."""

    metric: str = ""
    where: dict[str, Any] = option({})
    agg: Agg = "mean"
    direction: Literal["minimize", "maximize"] = "minimize"
    constraints: tuple[ConstraintOptions, ...] = option([])
    penalty: float | None = None  # null: +inf (minimize) / -inf (maximize)

    @classmethod
    def problems(cls, node, where: str) -> list[str]:
        # Each constraint is checked here with its index in the message (objective.constraints[0].min);
        # Options.problems would only see the list.
        raw = _plain(node)
        constraint_problems: list[str] = []
        items = raw.get("constraints")
        if isinstance(items, (list, tuple)):
            for i, item in enumerate(items):
                at = f"{where}.constraints[{i}]"
                if not isinstance(item, Mapping):
                    constraint_problems.append(f"{at}={show(item)} is not allowed: use a mapping "
                                               f"{{metric: ..., min: ..., max: ..., where: {{...}}}}")
                else:
                    constraint_problems += ConstraintOptions.problems(item, at)
            if constraint_problems:
                raw = {k: v for k, v in raw.items() if k != "constraints"}
        out = super().problems(raw, where) + constraint_problems
        if "metric" not in raw or (isinstance(raw.get("metric"), str) and not raw["metric"]):
            out.append(f"{where}.metric is required: the metric of the records to aggregate (e.g. f1)")
        penalty = raw.get("penalty")
        if isinstance(penalty, (int, float)) and not isinstance(penalty, bool) and math.isnan(penalty):
            out.append(f"{where}.penalty=nan is not allowed: use a number, inf, or null")
        return out + _where_problems(raw.get("where"), where)

    @classmethod
    def parse(cls, node=None, where: str | None = None) -> "ObjectiveOptions":
        # `objective` when parsed as a nested block of RunOptions (Options._convert passes no key)
        return super().parse(node, where or "objective")

    def worst(self) -> float:
        """The value of a trial that violates a constraint."""
        if self.penalty is not None:
            return self.penalty
        return math.inf if self.direction == "minimize" else -math.inf

    def describe(self) -> str:
        return _describe(self.metric, self.where, self.agg)


# ----------------------------------------------------------------------------- filtering
def _describe(metric: str, where: Mapping, agg: str) -> str:
    tags = ", ".join(f"{k}={show(v)}" for k, v in where.items())
    return f"{agg} of {metric}" + (f" where {tags}" if tags else "")


def _equal(tag, wanted) -> bool:
    if isinstance(tag, bool) or isinstance(wanted, bool):
        return tag is wanted
    if isinstance(tag, (int, float)) and isinstance(wanted, (int, float)):
        return float(tag) == float(wanted)
    return tag == wanted


def _matches(row: Mapping, where: Mapping) -> bool:
    for key, wanted in where.items():
        if wanted is None:
            if row.get(key) is not None:
                return False
        elif key not in row:
            return False
        elif isinstance(wanted, (list, tuple)):
            if not any(_equal(row[key], w) for w in wanted):
                return False
        elif not _equal(row[key], wanted):
            return False
    return True


def _no_match(what: str, records: list[Mapping], metric: str, where: Mapping) -> ConfigError:
    metrics = sorted({str(r.get("metric")) for r in records})
    same = [r for r in records if r.get("metric") == metric]
    if not same:
        listing = ", ".join(metrics) if metrics else "none"
        return ConfigError(f"{what} matches no record: the run has no metric {metric!r} "
                           f"(its metrics: {listing})")
    tags = {}
    for key in where:
        values = sorted({show(r[key]) for r in same if key in r})
        tags[key] = ", ".join(values) if values else "(no record of this metric has the tag)"
    found = "; ".join(f"{k}: {v}" for k, v in tags.items())
    return ConfigError(f"{what} matches no record: {len(same)} record(s) have metric {metric!r}, "
                       f"none with these tags (values they have: {found})")


def aggregate(records: list[Mapping], metric: str, where: Mapping, agg: str, what: str) -> float:
    """`agg` of the finite values of the records with `metric` and tags `where`; NaN when records
    match but none has a finite value; ConfigError when none matches."""
    rows = [r for r in records if r.get("metric") == metric and _matches(r, where)]
    if not rows:
        raise _no_match(what, records, metric, where)
    values = [float(r["value"]) for r in rows if r.get("value") is not None and math.isfinite(float(r["value"]))]
    if len(values) < len(rows):
        log.warning("%s: %d of %d matching record(s) have no finite value and are left out",
                    what, len(rows) - len(values), len(rows))
    if not values:
        return math.nan
    return float(AGGREGATES[agg](values))


def objective_value(records: list[Mapping], opts: ObjectiveOptions | Mapping) -> float:
    """The objective of a run's records (module docstring): the aggregate, or `opts.worst()` when
    a constraint is violated; NaN when the objective (or a constraint) has no finite value;
    ConfigError when a filter matches no record."""
    opts = ObjectiveOptions.of(opts, "objective")
    value = aggregate(records, opts.metric, opts.where, opts.agg, f"objective ({opts.describe()})")
    violated = []
    for i, c in enumerate(opts.constraints):
        got = aggregate(records, c.metric, c.where, c.agg, f"objective.constraints[{i}] ({c.describe()})")
        if math.isnan(got):
            log.warning("objective.constraints[%d] (%s) has no finite value: the objective is undefined", i, c.describe())
            return math.nan
        if (c.min is not None and got < c.min) or (c.max is not None and got > c.max):
            violated.append(f"{c.describe()} (got {got:.4g})")
    if violated:
        log.info("objective: constraint(s) violated, %s; value %g (penalty) instead of %.4g",
                 "; ".join(violated), opts.worst(), value)
        return opts.worst()
    return value


# ----------------------------------------------------------------------------- the CLI's hook
def _records(payload) -> list[Mapping]:
    """The metric records of a pipeline payload ({"run": ..., "metrics": [...]}), a results.json
    or a run directory holding one."""
    if isinstance(payload, Mapping):
        return list(payload.get("metrics") or [])
    from bdexp.results import RESULTS_FILE, read_results

    path = Path(payload)
    return list(read_results(path / RESULTS_FILE if path.is_dir() else path).get("metrics") or [])


def _sweeper_direction() -> str | None:
    """hydra.sweeper.direction of the running sweep (Optuna's), or None (no sweep, another sweeper,
    several objectives)."""
    try:
        from hydra.core.hydra_config import HydraConfig

        direction = HydraConfig.get().sweeper.get("direction")
    except Exception:  # noqa: BLE001 - no Hydra context (a Python caller)
        return None
    if direction is None or not isinstance(direction, str) and not hasattr(direction, "name"):
        return None
    return str(getattr(direction, "name", direction))


def run_objective(cfg, payload) -> float | None:
    """What the CLI's task function returns: None when `cfg.objective` is null; otherwise the
    objective of `payload` (pipeline.run's return value, or the run directory of a complete run
    the CLI skipped), logged. None (a failed trial for Hydra's Optuna sweeper) when the objective
    has no finite value; ConfigError when a filter matches no record (module docstring)."""
    node = cfg.get("objective")
    if node is None:
        return None
    opts = ObjectiveOptions.of(node, "objective")
    direction = _sweeper_direction()
    if direction is not None and direction != opts.direction:
        log.warning("objective.direction=%s but hydra.sweeper.direction=%s: the default penalty assumes %s",
                    opts.direction, direction, opts.direction)
    value = objective_value(_records(payload), opts)
    if math.isnan(value):
        log.warning("objective (%s) is undefined for this run: no finite value; the trial counts as failed",
                    opts.describe())
        return None
    log.info("objective (%s) = %.6g", opts.describe(), value)
    return value
