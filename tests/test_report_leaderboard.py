"""bdexp-report --table leaderboard (BackdoorBench's layout for the repair defenses) and the
matrix's repair columns, on hand-written results.json files with known answers (docs/tables.md)."""
from __future__ import annotations

import pandas as pd
import pytest
from omegaconf import OmegaConf

from bdexp.report.cli import report
from bdexp.report.collect import collect
from bdexp.report.leaderboard import NO_DEFENSE, SEEDS, leaderboard_table
from bdexp.report.matrix import CONFLICT, matrix_table
from bdexp.report.tables import MARK_COLUMN
from bdexp.results import run_identity, write_results


def _repair(name: str, ba: float, asr: float, ra: float, der: float, *, conflict: bool = False) -> list[dict]:
    """A repair defense's records as score_repair (bdexp/defenses/repair.py) writes them."""
    recs = [{"metric": m, "value": v, "defense": name} for m, v in
            (("ba", ba), ("asr", asr), ("tmr", asr), ("ra", ra), ("der", der), ("wall_s", 1.0),
             ("model_epochs", 2.0), ("repair_cache", 0.0))]
    return recs + ([{"metric": "threat_model_conflict", "value": 1.0, "defense": name}] if conflict else [])


def _run(tmp, name, *, attack="patched", train="standard", seed=0, ba=0.9, asr=1.0, ra=0.0, repairs=(),
         rate=None, ft_lr=None, reserve_ba=None):
    """A run as the pipeline writes it: identity from the composed config, its own model's
    records (no defense tag), then each repair defense's, with the undefended model's C-Acc and
    ASR on the images it was scored on (all test images, or those outside the reserve: `reserve_ba`)."""
    undefended = [{"metric": m, "value": v, "defense": rep[0]["defense"]} for rep in repairs
                  for m, v in (("ba_undefended", ba if reserve_ba is None else reserve_ba), ("asr_undefended", asr))]
    attack_node = {"name": attack, **({"poison_rate": rate} if rate is not None else {})}
    defense = {"ft": {"name": "ft", **({"lr": ft_lr} if ft_lr is not None else {})}}
    cfg = {"dataset": {"name": "digits"}, "model": {"name": "convnet"}, "seed": seed, "attack": attack_node,
           "train": {"name": train}, "defense": defense}
    run = {**run_identity(OmegaConf.create(cfg)), "config": cfg}
    metrics = [{"metric": "ba", "value": ba}, {"metric": "asr", "value": asr}, {"metric": "tmr", "value": asr},
               {"metric": "ra", "value": ra}, *(r for rep in repairs for r in rep), *undefended]
    write_results(tmp / "sweep" / name, run, metrics)


def _sweep(tmp):
    """patched (2 seeds, standard + mlmmdr), blended (not learnt), abl conflicting under mlmmdr."""
    _run(tmp, "0", seed=0, ba=0.90, asr=1.00, ra=0.00,
         repairs=[_repair("ft", 0.88, 0.10, 0.80, 0.94), _repair("abl", 0.85, 0.05, 0.70, 0.95)])
    _run(tmp, "1", seed=1, ba=0.80, asr=0.96, ra=0.02,
         repairs=[_repair("ft", 0.84, 0.30, 0.60, 0.83), _repair("abl", 0.75, 0.15, 0.50, 0.89)])
    _run(tmp, "2", train="mlmmdr", ba=0.86, asr=0.99, ra=0.01,
         repairs=[_repair("ft", 0.85, 0.90, 0.05, 0.54), _repair("abl", 0.80, 0.20, 0.60, 0.87, conflict=True)])
    _run(tmp, "3", attack="blended", ba=0.90, asr=0.30, ra=0.60,  # ASR 0.3 < 0.5: not learnt
         repairs=[_repair("ft", 0.89, 0.02, 0.85, 0.64), _repair("abl", 0.86, 0.01, 0.80, 0.62)])


@pytest.fixture(scope="module")
def sweep(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("lb")
    _sweep(tmp)
    return tmp, collect(tmp / "sweep")


def test_layout_means_over_seeds_and_no_defense_from_the_runs_own_records(sweep):
    _, frame = sweep
    table = leaderboard_table(frame)
    assert list(table.index.names) == ["attack", "regime"]
    groups = list(dict.fromkeys(table.columns.get_level_values(0)))
    assert groups == [NO_DEFENSE, "ft", "abl", SEEDS, MARK_COLUMN]  # BackdoorBench's order: FT ... ABL last
    assert [c[1] for c in table.columns[:4]] == ["C-Acc", "ASR", "RA", "DER"]
    row = table.loc[("patched", "standard")]
    # two seeds: (0.90, 0.80), (1.00, 0.96), ... -> means of the run's own records
    assert row[(NO_DEFENSE, "C-Acc")] == pytest.approx(0.85) and row[(NO_DEFENSE, "ASR")] == pytest.approx(0.98)
    assert row[(NO_DEFENSE, "RA")] == pytest.approx(0.01) and pd.isna(row[(NO_DEFENSE, "DER")])
    assert row[("ft", "ASR")] == pytest.approx(0.20) and row[("ft", "DER")] == pytest.approx(0.885)
    assert row[("ft", "C-Acc")] == pytest.approx(0.86) and row[("ft", "RA")] == pytest.approx(0.70)
    assert row[(SEEDS, "")] == 2 and table.loc[("patched", "ML"), (SEEDS, "")] == 1
    assert table.loc[("patched", "ML"), ("ft", "ASR")] == pytest.approx(0.90)  # ML-MMDR's backdoor survives FT


def test_unlearnt_attack_credits_no_defense_and_conflicts_read_na(sweep):
    _, frame = sweep
    table = leaderboard_table(frame)
    blended = table.loc[("blended", "standard")]
    assert blended[(NO_DEFENSE, "ASR")] == pytest.approx(0.30)  # the evidence stays
    assert all(pd.isna(blended[(d, m)]) for d in ("ft", "abl") for m in ("C-Acc", "ASR", "RA", "DER"))
    assert blended[(MARK_COLUMN, "")] == "not learnt (ASR 0.300)"
    assert table.loc[("patched", "standard"), (MARK_COLUMN, "")] == ""
    notes = table.attrs["notes"]
    assert any("ASR < 0.5" in n and "1 left out" in n for n in notes)
    assert not any("reserve" in n for n in notes)  # every repair scored on all test images
    ml = table.loc[("patched", "ML")]
    assert all(ml[("abl", m)] == CONFLICT for m in ("C-Acc", "ASR", "RA", "DER"))
    assert table.loc[("patched", "standard"), ("abl", "ASR")] == pytest.approx(0.10)
    assert any(n.startswith(CONFLICT) and "(abl)" in n and "training-time" in n for n in notes)


def test_cases_that_differ_stay_apart(tmp_path):
    """Two poison rates of one attack, and one defense option changed: four rows, never merged."""
    for i, (rate, lr, asr) in enumerate([(0.05, 0.01, 0.1), (0.1, 0.01, 0.2), (0.05, 0.02, 0.3), (0.1, 0.02, 0.4)]):
        _run(tmp_path, str(i), rate=rate, ft_lr=lr, repairs=[_repair("ft", 0.9, asr, 0.5, 0.9)])
    table = leaderboard_table(collect(tmp_path / "sweep"))
    assert list(table.index.names) == ["attack", "regime", "attack.poison_rate", "defense.ft.lr"]
    assert table.loc[("patched", "standard", 0.1, 0.02), ("ft", "ASR")] == pytest.approx(0.4)
    assert sorted(table[("ft", "ASR")]) == pytest.approx([0.1, 0.2, 0.3, 0.4])
    assert set(table[(SEEDS, "")]) == {1}


def test_repairs_scored_on_other_images_are_said_so(tmp_path):
    """clean_source=reserve: the repair is scored outside the reserve; "No defense" stays the run's
    own records (all test images) and a note gives the gap."""
    _run(tmp_path, "0", ba=0.90, reserve_ba=0.87, repairs=[_repair("fp", 0.86, 0.1, 0.8, 0.93)])
    table = leaderboard_table(collect(tmp_path / "sweep"))
    assert table.iloc[0][(NO_DEFENSE, "C-Acc")] == pytest.approx(0.90) and table.iloc[0][("fp", "ASR")] == 0.1
    assert any(n.startswith("fp: scored on the test images outside the defender's reserve") and "0.0300" in n
               for n in table.attrs["notes"])


def test_report_writes_mean_pm_std_and_the_trade_off_png(sweep, tmp_path):
    root, _ = sweep
    written = report(root / "sweep", tmp_path / "out", "all")  # registered: --table all renders it
    md = written["leaderboard:md"].read_text()
    # ft's ASR over seeds 0.10, 0.30: 0.2000 ± 0.1414; No defense C-Acc 0.90, 0.80: 0.8500 ± 0.0707
    assert "0.2000 ± 0.1414" in md and "0.8500 ± 0.0707" in md
    assert CONFLICT in md and "not learnt (ASR 0.300)" in md and "No defense / C-Acc" in md
    png = written["leaderboard:png"]
    assert png.name == "leaderboard.png" and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "[leaderboard](#leaderboard)" in written["report"].read_text()


def test_matrix_gains_repair_columns(sweep):
    _, frame = sweep
    table = matrix_table(frame)
    assert list(table.columns) == ["BA", "ASR", "ft ASR", "ft DER", "abl ASR", "abl DER", MARK_COLUMN]
    assert table.loc[("patched", "standard"), "ft ASR"] == pytest.approx(0.20)
    assert table.loc[("patched", "ML"), "ft ASR"] == pytest.approx(0.90)
    assert table.loc[("patched", "ML"), "ft DER"] == pytest.approx(0.54)
    assert table.loc[("patched", "ML"), "abl ASR"] == CONFLICT and table.loc[("patched", "ML"), "abl DER"] == CONFLICT
    assert pd.isna(table.loc[("blended", "standard"), "ft ASR"])  # not learnt: not credited
    assert "abl TMR" not in table.columns  # a training-time conflict is no sanitizer's
    notes = table.attrs["notes"]
    assert any("(abl)" in n and "training-time" in n for n in notes)
    assert not any("ISPL's defender" in n for n in notes)  # no sanitizer in this sweep


def test_cases_with_different_seeds_are_written_without_a_spread_that_mixes_them(tmp_path):
    """One case with seeds 0 and 1, another with seed 0 only (a failed job): the case key is
    constant within seed 1's runs, so seed 1's table lacks it; the tables are written, with the
    means of each case and no spread rather than one that mixes the cases."""
    _run(tmp_path, "0", seed=0, rate=0.1, asr=1.0, repairs=[_repair("ft", 0.88, 0.10, 0.80, 0.94)])
    _run(tmp_path, "1", seed=1, rate=0.1, asr=0.98, repairs=[_repair("ft", 0.86, 0.30, 0.60, 0.83)])
    _run(tmp_path, "2", seed=0, rate=0.2, asr=1.0, repairs=[_repair("ft", 0.80, 0.50, 0.40, 0.70)])
    for table in ("leaderboard", "matrix"):
        report(tmp_path / "sweep", table=table, out=tmp_path / f"out_{table}")
    md = (tmp_path / "out_leaderboard" / "leaderboard.md").read_text()
    assert "0.2000" in md and "0.5000" in md  # both cases: ft's mean ASR 0.2 (rate 0.1) and 0.5 (rate 0.2)
