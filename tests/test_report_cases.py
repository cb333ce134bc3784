"""bdexp-report never prints a merged or wrong table: every distinct run identity gets its own row
or column whatever method families a table mixes and whatever pandas does with NaN keys (pandas 3
drops them from groups and keeps NaN through astype(str)) or with True == 1; malformed
results.json files are skipped and counted; bdexp.load refuses a file that is not a results.json;
--out must be a directory; SWD1 is labelled as the m-fold sum it is (docs/tables.md,
docs/analyses.md)."""
from __future__ import annotations

import ast
import json
import logging
import os
import re
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from omegaconf import OmegaConf

import bdexp
import bdexp.report.cli as report_cli
from bdexp.errors import BdexpError
from bdexp.report.collect import ResultsFileError, collect
from bdexp.report.ispl import detail_table, summary_table
from bdexp.report.matrix import matrix_table
from bdexp.report.render import to_markdown
from bdexp.report.tables import SUCCESS_TMR, TABLES, runs_table
from bdexp.results import CASE_KEYS, record, run_identity, write_results

ROOT = Path(__file__).resolve().parents[1]


# ---- runs written as the pipeline writes them ---------------------------------------------------
def _write_run(root: Path, name: str, attack: str, tmr: float, *, seed: int = 0, extra_config: dict | None = None,
               **attack_keys) -> None:
    """results.json of an ISPL-style run: identity from the config, BA/ASR, ND's and ISPL+B's A."""
    config = {"seed": seed, "dataset": {"name": "cifar10"}, "model": {"name": "preact18"},
              "train": {"name": "standard"}, "attack": {"name": attack, **attack_keys}, **(extra_config or {})}
    run = {**run_identity(OmegaConf.create(config)), "config": config, "source": 0, "target": 2}
    metrics = [record("ba", 0.9), record("asr", 1.0), record("a", 0.9, defense="nd"), record("a", tmr, defense="ispl")]
    write_results(root / name, run, metrics)


def _cells(column: pd.Series) -> list[float]:
    return sorted(pd.to_numeric(column, errors="coerce").dropna().tolist())


def _summary_counts(table: pd.DataFrame, attack: str) -> tuple[int, int]:
    """(successes, cases) summed over the ε rows of ISPL Table 1's column(s) for `attack`."""
    cells = [c for col in table.columns if attack in col for c in table[col].dropna()]
    pairs = [tuple(int(x) for x in c.split(" (")[0].split(" / ")) for c in cells]
    return sum(s for s, _ in pairs), sum(n for _, n in pairs)


CLBD = [(0.01, 0.3), (0.02, 0.7), (0.03, 0.9)]  # (attack.pgd_eps, ISPL+B's TMR)
MARKS = [("peace", 0.0), ("letter_a", 0.5)]  # (attack.mark, ISPL+B's TMR)


@pytest.mark.parametrize("clbd_first", [True, False])
def test_clbd_settings_and_watermark_marks_stay_apart_end_to_end(tmp_path, clbd_first):
    """Three CLBD PGD settings and two watermark marks in one sweep: five cases in every table,
    whichever family collect reads first (pandas 3 merged the CLBD settings into one row)."""
    runs = [("clbd", tmr, {"pgd_eps": eps}) for eps, tmr in CLBD]
    runs += [("watermark", tmr, {"mark": m}) for m, tmr in MARKS]
    runs = runs if clbd_first else runs[::-1]
    for i, (attack, tmr, keys) in enumerate(runs):
        _write_run(tmp_path / "sweep", str(i), attack, tmr, **keys)
    frame = collect(tmp_path / "sweep")
    tmrs = sorted(t for _, t, _ in runs)

    detail = detail_table(frame)
    assert len(detail) == len(runs) and _cells(detail[("ispl", "a")]) == tmrs
    summary = summary_table(frame)
    for attack in ("clbd", "watermark"):
        mine = [t for a, t, _ in runs if a == attack]
        assert _summary_counts(summary, attack) == (sum(t < SUCCESS_TMR for t in mine), len(mine))
    matrix = matrix_table(frame)
    assert len(matrix) == len(runs) and _cells(matrix["ispl TMR"]) == tmrs
    table = runs_table(frame)
    shown = {tuple(v for n, v in zip(table.index.names, key) if n != "run_dir") for key in table.index}
    assert len(shown) == len(runs)  # the printed keys tell every run apart
    md = report_cli.report(tmp_path / "sweep", tmp_path / "out", "ispl_detail")["md"].read_text()
    assert all(f"| {eps:.4f} |" in md for eps, _ in CLBD) and all(f"| {m} |" in md for m, _ in MARKS)


def test_hostile_values_of_a_swept_key_stay_apart_end_to_end(tmp_path):
    """One swept key holding true, "True", 1, 1.0, "1", null, "-", a list, and missing in one run:
    true / "True" / 1 / "1" / null / "-" / [1, 2] / missing are eight cases; 1 and 1.0 are one
    value (as results._same compares options), so their two runs are averaged."""
    values = [True, "True", 1, 1.0, "1", None, "-", [1, 2]]
    tmrs = [0.11, 0.12, 0.13, 0.15, 0.17, 0.19, 0.23, 0.29]
    for i, (value, tmr) in enumerate(zip(values, tmrs)):
        _write_run(tmp_path / "sweep", str(i), "dlbd", tmr, extra_config={"extra": {"flag": value}})
    _write_run(tmp_path / "sweep", "9", "dlbd", 0.31)  # no extra.flag at all
    frame = collect(tmp_path / "sweep")
    want = sorted([*tmrs[:2], (tmrs[2] + tmrs[3]) / 2, *tmrs[4:], 0.31])
    matrix = matrix_table(frame)
    assert "extra.flag" in matrix.index.names
    assert _cells(matrix["ispl TMR"]) == pytest.approx(want)
    labels = [str(v) for v in matrix.index.get_level_values("extra.flag")]
    assert len(set(labels)) == len(labels) == len(want)  # every row reads differently
    assert {"True", "'True'", "'1'", "null", "'-'", "-", "[1, 2]"} <= set(labels)
    detail = detail_table(frame)
    assert _cells(detail[("ispl", "a")]) == pytest.approx(sorted([*tmrs[:2], np.median(tmrs[2:4]), *tmrs[4:], 0.31]))
    assert _summary_counts(summary_table(frame), "dlbd") == (0, len(want))


# ---- the property: generated frames shaped like collect()'s output -------------------------------
FAMILIES = {  # attack -> the keys its runs may hold (mixing families mixes keys)
    "clbd": ["attack.pgd_eps", "attack.flag"],
    "watermark": ["attack.mark", "attack.flag", "defense.ispl.alpha"],
    "dlbd": ["attack.flag", "defense.ispl.alpha"],
    "patched": ["attack.size"],
}
KEYS = sorted({k for keys in FAMILIES.values() for k in keys})
HOSTILE = [True, False, 1, 1.0, 0, 0.5, "True", "1", "-", "nan", "null", "[1, 2]", "a", "b"]
ABSENT = object()


def _canon(value) -> tuple:
    """The identity of one key's value as the docs define it: missing is a value of its own,
    booleans are not numbers, 1 and 1.0 are one number, strings are themselves."""
    if value is ABSENT:
        return ("missing",)
    if isinstance(value, bool):
        return ("bool", value)
    if isinstance(value, (int, float)):
        return ("number", float(value))
    return ("text", value)


def _generated_runs(rng: np.random.Generator) -> list[dict]:
    runs = []
    for i in range(int(rng.integers(3, 9))):
        attack = str(rng.choice(list(FAMILIES)))
        keys = {k: HOSTILE[rng.integers(len(HOSTILE))] for k in FAMILIES[attack] if rng.random() < 0.7}
        ident = (attack, *(_canon(keys.get(k, ABSENT)) for k in KEYS))
        seed = sum(r["identity"] == ident for r in runs)  # a repeated identity is another seed
        runs.append({"attack": attack, "keys": keys, "identity": ident, "seed": seed,
                     "value": float(rng.uniform(0, 0.02)), "run_dir": f"/sweep/{i}"})
    return runs


def _frame(runs: list[dict]) -> pd.DataFrame:
    """One row per record, tagged as collect tags them (identity columns, run_dir, CASE_KEYS)."""
    rows = []
    for run in runs:
        base = {"dataset": "cifar10", "model": "preact18", "attack": run["attack"], "train": "standard",
                "regime": "standard", **run["keys"], "scale": "full", "seed": run["seed"], "bdexp_version": "0.1.0",
                "source": 0, "target": 2, "run_dir": run["run_dir"], "status": "complete",
                CASE_KEYS: ("dataset", "model", "attack", "regime", "train", *run["keys"], "scale")}
        v = run["value"]
        for rec in (record("ba", 0.9 + v), record("asr", 1.0), record("a", 0.9, defense="nd"),
                    record("a", v, defense="ispl"),
                    record("f1", v, defense="ac", level="s3", N=100, r=1.0, rule="reserve"),
                    record("auroc", v, defense="cd", pool="test"),
                    record("mmd2", v, analysis="distances", level="s1", pair="malicious"),
                    record("target_anomaly_index", v, defense="nc")):
            rows.append({**base, **rec})
    return pd.DataFrame(rows)


# table -> (the column holding each case's value, how seeds are aggregated)
PIVOTS = {"ispl_detail": (("ispl", "a"), np.median), "matrix": ("ispl TMR", np.mean),
          "f1_levels": ((100, 1.0, "s3"), np.mean), "detect": ("cd", np.mean), "distances": (("mmd2", "s1"), np.mean),
          "nc": ("target_anomaly_index", np.mean)}


def _expected(runs: list[dict], aggregate, attacks=None) -> list[float]:
    by_case: dict[tuple, list[float]] = {}
    for run in runs:
        if attacks is None or run["attack"] in attacks:
            by_case.setdefault(run["identity"], []).append(run["value"])
    return sorted(float(aggregate(v)) for v in by_case.values())


def test_every_distinct_run_identity_gets_its_own_row_in_every_pivot():
    rng = np.random.default_rng(20260529)
    for trial in range(12):
        runs = _generated_runs(rng)
        frame = _frame(runs)
        for name, (column, aggregate) in PIVOTS.items():
            table = TABLES.get(name)(frame)
            assert _cells(table[column]) == pytest.approx(_expected(runs, aggregate)), (trial, name, runs)
            to_markdown(table)  # and it renders
        table = runs_table(frame)
        assert _cells(table["ba"]) == pytest.approx(sorted(0.9 + r["value"] for r in runs))
        shown = {}
        for key in table.index:
            row = dict(zip(table.index.names, key))
            run_dir, _ = row.pop("run_dir"), row.pop("seed")
            run = next(r for r in runs if r["run_dir"] == run_dir)
            shown.setdefault(tuple(map(str, row.values())), set()).add(run["identity"])
        assert all(len(ids) == 1 for ids in shown.values()), (trial, shown)  # rows that read alike are one case
        summary = summary_table(frame)
        for attack in {r["attack"] for r in runs}:
            cases = _expected(runs, np.median, {attack})
            assert _summary_counts(summary, attack) == (sum(c < SUCCESS_TMR for c in cases), len(cases)), (trial, runs)


# ---- malformed results.json ---------------------------------------------------------------------
GOOD_RUN = {"dataset": "digits", "model": "convnet", "attack": "patched", "train": "standard", "seed": 0}
MALFORMED = {
    "run is text": {"status": "complete", "run": "x", "metrics": [{"metric": "ba", "value": 0.5}]},
    "metrics is a number": {"status": "complete", "run": GOOD_RUN, "metrics": 5},
    "record without value": {"status": "complete", "run": GOOD_RUN, "metrics": [{"metric": "ba"}]},
    "record not an object": {"status": "complete", "run": GOOD_RUN, "metrics": [{"metric": "ba", "value": 0.5}, 3]},
    "record is text": {"status": "complete", "run": GOOD_RUN, "metrics": ["ba"]},
    "record without name": {"status": "complete", "run": GOOD_RUN, "metrics": [{"value": 0.5}]},
    "name not text": {"status": "complete", "run": GOOD_RUN, "metrics": [{"metric": 5, "value": 0.5}]},
    "value is text": {"status": "complete", "run": GOOD_RUN, "metrics": [{"metric": "ba", "value": "0.5"}]},
    "value is boolean": {"status": "complete", "run": GOOD_RUN, "metrics": [{"metric": "ba", "value": True}]},
    "value is a list": {"status": "complete", "run": GOOD_RUN, "metrics": [{"metric": "ba", "value": [0.5]}]},
    "payload is a list": [GOOD_RUN],
    "payload is null": None,
    "empty object": {},
    "no metrics": {"status": "complete", "run": GOOD_RUN},
    "no run": {"status": "complete", "metrics": [{"metric": "ba", "value": 0.5}]},
    "status not text": {"status": 5, "run": GOOD_RUN, "metrics": [{"metric": "ba", "value": 0.5}]},
    "config not an object": {"run": {**GOOD_RUN, "config": 5}, "metrics": [{"metric": "ba", "value": 0.5}]},
    "case_keys not a list": {"run": {**GOOD_RUN, "case_keys": "dataset"}, "metrics": [{"metric": "ba", "value": 0.5}]},
    "case_keys not names": {"run": {**GOOD_RUN, "case_keys": [1, {"a": 1}]},
                            "metrics": [{"metric": "ba", "value": 0.5}]},
    "seed is text": {"run": {**GOOD_RUN, "seed": "zero"}, "metrics": [{"metric": "ba", "value": 0.5}]},
}
NOT_JSON = {"truncated": '{"status": "complete", "run": {"data', "binary": b"\x89PNG\r\n\x1a\n\x00\xff"}


def _write_bad(path: Path, content) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    if isinstance(content, bytes):
        path.write_bytes(content)
    elif isinstance(content, str):
        path.write_text(content)
    else:
        path.write_text(json.dumps(content))


@pytest.mark.parametrize("shape", [*MALFORMED, *NOT_JSON, "a directory"])
def test_one_malformed_results_json_is_skipped_named_and_counted(tmp_path, shape, caplog, capsys):
    write_results(tmp_path / "sweep" / "0", {**GOOD_RUN, "seed": 1}, [record("ba", 0.75), record("asr", 0.5)])
    bad = tmp_path / "sweep" / "1" / "results.json"
    if shape == "a directory":
        bad.mkdir(parents=True)
    else:
        _write_bad(bad, MALFORMED.get(shape, NOT_JSON.get(shape)))
    with caplog.at_level(logging.WARNING):
        frame = bdexp.collect(tmp_path / "sweep")
    assert set(frame["run_dir"]) == {str(tmp_path / "sweep" / "0")}
    assert frame.loc[frame["metric"] == "ba", "value"].tolist() == [0.75]
    warned = [r.getMessage() for r in caplog.records if str(bad) in r.getMessage()]
    assert len(warned) == 1 and "skipping" in warned[0], caplog.text
    written = report_cli.report(tmp_path / "sweep", tmp_path / "out", "all")
    text = written["report"].read_text()
    assert f"1 unreadable results.json skipped: {bad}" in text and "1 complete run(s)" in text
    assert "0.7500" in (tmp_path / "out" / "runs.md").read_text()
    assert "failed:" not in capsys.readouterr().out  # no table broke on what the file held
    if shape != "a directory":
        with pytest.raises(ResultsFileError, match="not a bdexp results.json") as err:
            bdexp.load(bad)
        assert str(bad) in str(err.value) and "\n" not in str(err.value)


def test_a_record_cannot_replace_its_runs_directory_or_case(tmp_path):
    """Tags named as collect's own columns, and a list as a tag value: the run's columns win, the
    list reads as JSON text."""
    write_results(tmp_path / "r", GOOD_RUN, [{"metric": "ba", "value": 0.5, "run_dir": "elsewhere", "case_keys": 5,
                                              "status": "failed", "pool": ["a", "b"]}])
    frame = collect(tmp_path / "r")
    row = frame.iloc[0]
    assert row["run_dir"] == str(tmp_path / "r") and row["status"] == "complete" and isinstance(row[CASE_KEYS], tuple)
    assert row["pool"] == '["a", "b"]'


def test_runs_without_identity_and_interrupted_runs_break_no_table(tmp_path, capsys):
    """A well-formed run object that names no dataset or regime (written by hand), and an
    interrupted run: every table still renders or says it has no records; the footer counts the
    interrupted run."""
    write_results(tmp_path / "s" / "0", {},
                  [record("ba", 0.5), record("f1", 0.5, defense="ac", level="s3", N=100, r=1.0)])
    write_results(tmp_path / "s" / "1", GOOD_RUN, [record("ba", 0.25)], status="interrupted")
    written = report_cli.report(tmp_path / "s", tmp_path / "out", "all")
    out = capsys.readouterr().out
    assert "failed:" not in out and "f1_levels" in out
    assert f"1 interrupted run(s) skipped: {tmp_path / 's' / '1'}" in written["report"].read_text()


# ---- bdexp.load / bdexp.collect on what is not a results.json -----------------------------------
@pytest.mark.parametrize("content", ['{"a": 1}', "[1, 2]", "hello, not json", '{"run": {}, "metrics": 3}'])
def test_load_refuses_a_file_that_is_not_a_results_json(tmp_path, content):
    path = tmp_path / "notes.json"
    path.write_text(content)
    with pytest.raises(ResultsFileError) as err:
        bdexp.load(path)
    assert isinstance(err.value, BdexpError) and isinstance(err.value, ValueError)
    message = str(err.value)
    assert str(path) in message and "not a bdexp results.json" in message and "\n" not in message
    with pytest.raises(ResultsFileError):  # a file given to collect is read as load reads it
        bdexp.collect(path)
    with pytest.raises(ResultsFileError):  # a run directory holding such a file, too
        (tmp_path / "run").mkdir()
        (tmp_path / "run" / "results.json").write_text(content)
        bdexp.load(tmp_path / "run")


def test_collect_on_a_folder_without_results_says_so(tmp_path):
    (tmp_path / "empty" / "sub").mkdir(parents=True)
    (tmp_path / "empty" / "sub" / "notes.json").write_text("{}")
    with pytest.raises(FileNotFoundError, match=r"no results\.json under .*empty"):
        bdexp.collect(tmp_path / "empty")
    with pytest.raises(FileNotFoundError, match=r"bdexp\.collect"):  # a sweep given to load points to collect
        bdexp.load(tmp_path / "empty")


# ---- --out must be a directory ------------------------------------------------------------------
def _main(argv, capsys) -> tuple[int, str]:
    try:
        report_cli.main([str(a) for a in argv])
        code = 0
    except SystemExit as exit_:
        code = exit_.code
    return code, capsys.readouterr().err


def _files(root: Path) -> dict[str, bytes]:
    return {str(p): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.mark.parametrize("case", ["an existing file", "under a file", "deep under a file", "a broken link"])
def test_out_that_cannot_be_a_directory_is_an_error(tmp_path, capsys, case):
    write_results(tmp_path / "sweep" / "0", GOOD_RUN, [record("ba", 0.75), record("asr", 0.5)])
    taken = tmp_path / "taken.txt"
    taken.write_text("keep me")
    out = {"an existing file": taken, "under a file": taken / "report",
           "deep under a file": taken / "a" / "b", "a broken link": tmp_path / "link"}[case]
    if case == "a broken link":
        os.symlink(tmp_path / "nowhere", out)
    before = _files(tmp_path)
    for table in ("runs", "all"):
        code, err = _main([tmp_path / "sweep", "--out", out, "--table", table], capsys)
        lines = [ln for ln in err.splitlines() if ln.strip()]
        assert code == 2 and len(lines) == 1 and lines[0].startswith("bdexp-report error: --out"), err
        assert str(out) in lines[0]
    assert _files(tmp_path) == before and not (tmp_path / "nowhere").exists()  # nothing written


# ---- SWD1 is m × the usual sliced Wasserstein-1 -------------------------------------------------
def _w1_by_cdfs(a: np.ndarray, b: np.ndarray) -> float:
    """W1 of two 1-D empirical distributions as the integral of |F_a − F_b| (no sorted pairing)."""
    grid = np.sort(np.concatenate([a, b]))
    fa = np.searchsorted(np.sort(a), grid[:-1], side="right") / len(a)
    fb = np.searchsorted(np.sort(b), grid[:-1], side="right") / len(b)
    return float(np.sum(np.abs(fa - fb) * np.diff(grid)))


@pytest.mark.parametrize("m", [7, 40])
def test_swd1_is_m_times_the_usual_sliced_wasserstein(m):
    from bdexp.analysis.kernels import swd1

    g = torch.Generator().manual_seed(m)
    x = torch.randn(m, 5, generator=g, dtype=torch.float64)
    y = torch.randn(m, 5, generator=g, dtype=torch.float64) + 0.3
    seed, n_dirs = 11, 13
    dirs = torch.randn(5, n_dirs, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)  # swd1's draw
    dirs = (dirs / dirs.norm(dim=0, keepdim=True)).numpy()
    usual = np.mean([_w1_by_cdfs(x.numpy() @ d, y.numpy() @ d) for d in dirs.T])  # mean over directions of W1
    got = float(swd1(x, y, n_dirs, generator=torch.Generator().manual_seed(seed)))
    assert got == pytest.approx(m * usual, rel=1e-10)


def test_the_distances_table_and_the_run_summary_say_what_swd1_sums(tmp_path, capsys, monkeypatch):
    from bdexp.report.mmdr import distances_table
    from bdexp.report.summary import print_summary

    for i, m in enumerate((120, 500)):
        records = [record("set_size", m, analysis="distances")]
        records += [record(d, 0.1 * (j + 1), analysis="distances", level=lv, pair=p)
                    for j, d in enumerate(("mmd2", "ed2", "swd1")) for lv in ("s1", "s2", "s3")
                    for p in ("malicious", "intra", "inter")]
        write_results(tmp_path / "sweep" / str(i), {**GOOD_RUN, "seed": i}, [record("ba", 0.9), *records])
    table = distances_table(collect(tmp_path / "sweep"))
    notes = [n for n in table.attrs["notes"] if n.startswith("SWD1 = sum over the m = 120, 500 samples per set")]
    assert len(notes) == 1 and "m × the usual sliced Wasserstein-1" in notes[0]
    md = report_cli.report(tmp_path / "sweep", tmp_path / "out", "distances")["md"].read_text()
    assert "SWD1 = sum over the m = 120, 500 samples" in md
    monkeypatch.setenv("COLUMNS", "200")
    run = dict(GOOD_RUN, device="cpu", wall_s=1.0, model_cache="hit")
    print_summary(run, json.loads((tmp_path / "sweep" / "1" / "results.json").read_text())["metrics"])
    assert "SWD1 = sum over the m = 500 samples per set (m × the usual sliced Wasserstein-1" in capsys.readouterr().out


# ---- Result.metric's example uses the tags records carry ----------------------------------------
def test_the_metric_docstring_example_uses_real_tags():
    """The example call picks a record tagged as docs/metrics.md documents a screening pool's F1."""
    documented = re.search(r'\{"metric": "f1".*?\}', (ROOT / "docs" / "metrics.md").read_text(), re.S).group(0)
    rec = json.loads(" ".join(documented.split()))
    doc = bdexp.Result.metric.__doc__
    call = ast.parse(doc[doc.index('metric("f1"'):].split("`")[0]).body[0].value
    tags = {kw.arg for kw in call.keywords}
    assert tags and tags <= set(rec) - {"metric", "value"}, (tags, rec)
