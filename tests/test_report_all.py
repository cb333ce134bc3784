"""bdexp-report --table all / matrix / provenance on hand-written results.json files (known answers)."""
from __future__ import annotations

import json

import pandas as pd
import pytest

from bdexp.report.cli import report
from bdexp.report.collect import collect
from bdexp.report.matrix import matrix_table
from bdexp.results import write_results


def _run(tmp, name, *, attack="patched", train="standard", seed=0, ba=0.9, asr=1.0, extra=(), lam=None):
    run = {"dataset": "digits", "model": "convnet", "attack": attack, "attack_mode": "all_to_one", "train": train,
           "seed": seed, "bdexp_version": "0.1.0", "lambda": lam}
    metrics = [{"metric": "ba", "value": ba}, {"metric": "asr", "value": asr}, *extra]
    write_results(tmp / "sweep" / name, run, metrics)


def _detectors(ac, cd, ispl_a):
    return [
        {"metric": "auroc", "value": ac, "defense": "ac", "level": "s3", "N": 100, "r": 0.1},
        {"metric": "auroc", "value": ac + 0.1, "defense": "ac", "level": "s3", "N": 100, "r": 1.0},
        {"metric": "auroc", "value": 0.0, "defense": "ac", "level": "s1", "N": 100, "r": 1.0},  # not s3: ignored
        {"metric": "auroc", "value": cd, "defense": "cd", "pool": "test"},
        {"metric": "auroc", "value": 0.0, "defense": "cd", "pool": "train"},  # not the test pool: ignored
        {"metric": "a", "value": ispl_a, "defense": "ispl"},
        {"metric": "c", "value": 0.8, "defense": "ispl"},
    ]


def test_matrix_cells_are_the_documented_selections(tmp_path):
    _run(tmp_path, "0", extra=_detectors(0.6, 0.9, 0.02))
    _run(tmp_path, "1", train="mlmmdr", asr=0.95, extra=_detectors(0.5, 0.7, 0.5))
    table = matrix_table(collect(tmp_path / "sweep"))
    assert list(table.columns) == ["BA", "ASR", "ac s3", "cd", "ispl TMR"]
    assert table.loc[("patched", "standard"), "ac s3"] == pytest.approx(0.65)  # mean over the s3 pools
    assert table.loc[("patched", "ML"), "cd"] == pytest.approx(0.7)
    assert table.loc[("patched", "ML"), "ispl TMR"] == pytest.approx(0.5)
    assert table.loc[("patched", "ML"), "ASR"] == pytest.approx(0.95)


def test_all_tables_report_md_seed_spread_and_failed_jobs(tmp_path):
    _run(tmp_path, "0", seed=0, extra=_detectors(0.6, 0.9, 0.0))
    _run(tmp_path, "1", seed=1, extra=_detectors(0.8, 0.7, 0.0))
    write_results(tmp_path / "sweep" / "2", {"attack": "sig", "seed": 2, "error": {"type": "ValueError"}}, [],
                  status="failed")
    written = report(tmp_path / "sweep", tmp_path / "out", "all")
    text = written["report"].read_text()
    assert "[matrix](#matrix)" in text and "[runs](#runs)" in text
    assert "(matrix.csv)" in text
    # two seeds: 0.6/0.7 and 0.8/0.9 s3 pools -> means 0.65 and 0.85 -> mean 0.75, std 0.1414
    assert "0.7500 ± 0.1414" in (tmp_path / "out" / "matrix.md").read_text()
    csv = pd.read_csv(tmp_path / "out" / "matrix.csv", index_col=[0, 1])
    assert csv.loc[("patched", "standard"), "ac s3"] == pytest.approx(0.75)
    assert "1 failed job(s)" in text and str(tmp_path / "sweep" / "2") in text
    assert "seeds [0, 1] (mean ± std over seeds)" in text


def test_only_failed_runs_give_a_clear_error(tmp_path):
    from bdexp.errors import BdexpError

    write_results(tmp_path / "s" / "0", {"attack": "sig", "error": {"type": "ValueError"}}, [], status="failed")
    with pytest.raises(BdexpError, match="1 failed run"):
        report(tmp_path / "s", None, "runs")


def test_all_survives_a_sweep_with_one_lambda(tmp_path):
    """A matrix-like sweep (one λ) once broke the mmdr_lambda plot and with it --table all."""
    _run(tmp_path, "0", extra=_detectors(0.6, 0.9, 0.0))
    _run(tmp_path, "1", train="mlmmdr", lam=0.3, extra=_detectors(0.5, 0.7, 0.5))
    written = report(tmp_path / "sweep", tmp_path / "out", "all")
    assert "mmdr_lambda:png" in written and written["mmdr_lambda:png"].exists()
    assert "[matrix](#matrix)" in written["report"].read_text()
