"""The sweep objective (bdexp/objective.py): one number of a run's records, chosen in the
config, that the CLI returns to Hydra's sweeper; and the Optuna preset end to end."""
from __future__ import annotations

import importlib.util
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from bdexp.errors import ConfigError
from bdexp.objective import ObjectiveOptions, objective_value, run_objective
from tests.conftest import TINY, compose_cfg

ROOT = Path(__file__).resolve().parents[1]


def rec(metric, value, **tags):
    return {"metric": metric, "value": value, **tags}


# A run's records as pipeline.run returns them: the run's own BA/ASR (no defense tag), AC's F1 at
# two levels and two pools, an SS F1, and an ASR of a defense (NC's pruning curve).
RECORDS = [
    rec("ba", 0.95), rec("asr", 0.92),
    rec("f1", 0.2, defense="ac", level="s3", N=100, r=0.1, rule="reserve"),
    rec("f1", 0.6, defense="ac", level="s3", N=100, r=1.0, rule="reserve"),
    rec("f1", 0.4, defense="ac", level="s2", N=100, r=0.1, rule="reserve"),
    rec("f1", 0.9, defense="ss", level="s3", N=100, r=0.1),
    rec("asr", 0.1, defense="nc", prune_ratio=0.5),
]


def value(**objective):
    return objective_value(RECORDS, objective)


@pytest.mark.parametrize("agg,expected", [("mean", 0.4), ("min", 0.2), ("max", 0.6), ("median", 0.4)])
def test_aggregates_of_the_matching_records(agg, expected):
    assert value(metric="f1", where={"defense": "ac", "level": "s3"}, agg=agg) == pytest.approx(expected)


def test_tag_filters():
    assert value(metric="f1", where={"defense": "ac"}) == pytest.approx((0.2 + 0.6 + 0.4) / 3)
    assert value(metric="f1", where={"level": "s3"}) == pytest.approx((0.2 + 0.6 + 0.9) / 3)
    assert value(metric="f1", where={"defense": "ac", "r": 1}) == pytest.approx(0.6)  # 1 matches r′ = 1.0
    assert value(metric="f1", where={"defense": "ac", "level": ["s2", "s3"]}, agg="max") == pytest.approx(0.6)
    assert value(metric="asr") == pytest.approx((0.92 + 0.1) / 2)  # no filter: every asr record
    assert value(metric="asr", where={"defense": None}) == pytest.approx(0.92)  # null: the tag is absent


def test_a_non_finite_record_is_left_out_and_all_of_them_make_nan(caplog):
    rows = RECORDS + [rec("f1", None, defense="ac", level="s3", N=500, r=0.1)]
    assert objective_value(rows, {"metric": "f1", "where": {"defense": "ac", "level": "s3"}}) == pytest.approx(0.4)
    assert "1 of 3 matching record(s) have no finite value" in caplog.text
    assert math.isnan(objective_value([rec("f1", None, defense="ac")], {"metric": "f1"}))


def test_constraint_met_and_violated():
    base = {"metric": "f1", "where": {"defense": "ac", "level": "s3"}}
    met = [{"metric": "asr", "min": 0.9, "where": {"defense": None}}]
    assert value(**base, constraints=met) == pytest.approx(0.4)
    violated = [{"metric": "asr", "min": 0.95, "where": {"defense": None}}]
    assert value(**base, constraints=violated) == math.inf  # default penalty: the worst when minimizing
    assert value(**base, constraints=violated, penalty=1.0) == 1.0
    assert value(**base, constraints=violated, direction="maximize") == -math.inf
    # a max bound, and the mean of both ASR records (0.51) against it
    assert value(**base, constraints=[{"metric": "asr", "max": 0.5}]) == math.inf
    assert value(**base, constraints=[{"metric": "asr", "max": 0.6}, {"metric": "ba", "min": 0.9}]) == pytest.approx(0.4)


def test_no_match_names_the_filter_and_what_the_run_has():
    with pytest.raises(ConfigError, match=r"no metric 'f2' \(its metrics: asr, ba, f1\)"):
        value(metric="f2")
    with pytest.raises(ConfigError) as err:
        value(metric="f1", where={"defense": "ac", "level": "s4"})
    msg = str(err.value)
    assert "mean of f1 where defense='ac', level='s4'" in msg
    assert "level: 's2', 's3'" in msg and "defense: 'ac', 'ss'" in msg
    with pytest.raises(ConfigError, match=r"objective.constraints\[0\] \(mean of tmr >= 0.9\).*no metric 'tmr'"):
        value(metric="f1", constraints=[{"metric": "tmr", "min": 0.9}])


def test_declaration_refuses_bad_blocks_with_the_key():
    problems = ObjectiveOptions.problems
    assert problems({"metric": "f1", "agg": "avg"}, "objective") == [
        "objective.agg='avg' is not allowed: use one of mean, min, max, median"]
    assert any("objective.metric is required" in p for p in problems({"where": {"level": "s3"}}, "objective"))
    assert any("may not filter on metric" in p for p in problems({"metric": "f1", "where": {"metric": "f1"}}, "objective"))
    out = problems({"metric": "f1", "constraints": [{"metric": "asr"}, {"metric": "asr", "min": "x"}, 3]}, "objective")
    assert "objective.constraints[0]: set min, max or both (e.g. min: 0.9)" in out
    assert any(p.startswith("objective.constraints[1].min='x' is not allowed") for p in out)
    assert any(p.startswith("objective.constraints[2]=3 is not allowed") for p in out)
    assert any("unknown key(s) foo" in p for p in problems({"metric": "f1", "foo": 1}, "objective"))
    assert problems({"metric": "f1", "constraints": [{"metric": "asr", "min": 0.9, "max": 0.5}]}, "objective") == [
        "objective.constraints[0]: min=0.9 is above max=0.5"]
    opts = ObjectiveOptions.parse({"metric": "f1", "constraints": [{"metric": "asr", "min": 0.9}]})
    assert opts.constraints[0].min == 0.9 and opts.worst() == math.inf


def test_run_objective_is_none_without_an_objective_and_reads_a_run_dir(tmp_path):
    assert run_objective(OmegaConf.create({"objective": None}), {"metrics": RECORDS}) is None
    cfg = OmegaConf.create({"objective": {"metric": "f1", "where": {"defense": "ac", "level": "s3"}}})
    assert run_objective(cfg, {"run": {}, "metrics": RECORDS}) == pytest.approx(0.4)
    (tmp_path / "results.json").write_text(json.dumps({"status": "complete", "run": {}, "metrics": RECORDS}))
    assert run_objective(cfg, tmp_path) == pytest.approx(0.4)  # a complete run the CLI skipped
    undefined = OmegaConf.create({"objective": {"metric": "f1"}})
    assert run_objective(undefined, {"metrics": [rec("f1", None)]}) is None  # a failed trial, not NaN


def test_preset_composes_with_its_objective():
    """experiment=optuna_mlmmdr's objective reaches the composed config (conf/config.yaml's
    `objective: null` must merge before the experiment preset)."""
    cfg = compose_cfg(["experiment=optuna_mlmmdr"])
    assert cfg.train.name == "mlmmdr" and list(cfg.defense) == ["ac"]
    opts = ObjectiveOptions.parse(cfg.objective)
    assert (opts.metric, opts.agg, opts.where) == ("f1", "mean", {"defense": "ac", "level": "s3"})
    assert opts.constraints[0].metric == "asr" and opts.constraints[0].min == 0.9


# ----------------------------------------------------------------------------- end to end
HAS_OPTUNA = importlib.util.find_spec("hydra_plugins.hydra_optuna_sweeper") is not None


NEEDS_OPTUNA = pytest.mark.skipif(not HAS_OPTUNA, reason="hydra-optuna-sweeper is not installed "
                                  "(hydra_plugins.hydra_optuna_sweeper does not import)")


def _sweep(tmp_path, *extra):
    """`bdexp -m experiment=optuna_mlmmdr` on tiny synthetic runs (tests/conftest.py TINY, 3 trials)."""
    sweep = tmp_path / "sweep"
    tiny = [t for t in TINY if not t.startswith(("defense=", "analysis="))]
    args = [sys.executable, "-m", "bdexp", "-m", "experiment=optuna_mlmmdr", *tiny, "train.epochs=2",
            "screening.sizes=[10]", "screening.ratios=[0.5,1.0]", "screening.levels=[s3]",
            "screening.reserve_per_class=5", "defense.ac.n_components=2", "hydra.sweeper.n_trials=3",
            f"cache.dir={tmp_path / 'cache'}", f"hydra.sweep.dir={sweep}", *extra]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    return sweep, subprocess.run(args, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)


def _trials(sweep):
    """(objective recomputed from results.json, the trial's searched values) of every trial."""
    out = []
    for run_dir in sorted((p for p in sweep.iterdir() if p.is_dir() and (p / "results.json").is_file()),
                          key=lambda p: int(p.name)):
        payload = json.loads((run_dir / "results.json").read_text())
        assert payload["status"] == "complete"
        config = payload["run"]["config"]
        out.append((objective_value(payload["metrics"], config["objective"]),
                    {"train.mmd_weight": config["train"]["mmd_weight"],
                     "attack.poison_rate": config["attack"]["poison_rate"]}))
    return out


@NEEDS_OPTUNA
def test_optuna_sweep_returns_the_objective_of_each_trial(tmp_path):
    """Optuna's best trial is the one whose results.json gives the smallest objective, and its
    best_value is that objective (bdexp.cli returns run_objective's value to the sweeper)."""
    # tiny runs reach neither ASR 0.9 nor BA 0.8 reliably: a bound every run meets, so best_value is an F1
    sweep, out = _sweep(tmp_path, "objective.constraints=[{metric: asr, min: 0.0, where: {defense: null}}]")
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    best = OmegaConf.to_container(OmegaConf.load(sweep / "optimization_results.yaml"))
    assert set(best["best_params"]) == {"train.mmd_weight", "attack.poison_rate"}
    trials = _trials(sweep)
    assert len(trials) == 3 and all(math.isfinite(v) for v, _ in trials)
    best_value, best_params = min(trials, key=lambda t: t[0])  # the first of equal values, as Optuna
    assert best["best_value"] == pytest.approx(best_value)
    assert best["best_params"] == pytest.approx(best_params)


@NEEDS_OPTUNA
def test_an_objective_that_matches_nothing_stops_the_sweep_and_keeps_the_results(tmp_path):
    sweep, out = _sweep(tmp_path, "objective.where.level=s9")
    assert out.returncode == 2, out.stdout[-3000:] + out.stderr[-3000:]
    assert ("bdexp error: objective (mean of f1 where defense='ac', level='s9') matches no record"
            in out.stderr), out.stderr[-3000:]
    assert "level: 's3'" in out.stderr  # what the run has
    assert not (sweep / "optimization_results.yaml").exists()
    assert json.loads((sweep / "0" / "results.json").read_text())["status"] == "complete"
    assert not (sweep / "1").exists()  # stopped at the first trial
