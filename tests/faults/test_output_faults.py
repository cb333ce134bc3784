"""Output a person can read: bdexp-report on a read-only sweep and on a results.json
path, tables within 80 columns with no cell cut, a runs table that tells swept jobs apart, one log
format, and one warning with a count for a detector's skipped pools."""
from __future__ import annotations

import json
import os
import re
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import pytest

import bdexp.report.cli as report_cli
from tests.conftest import with_tiny

ROOT = Path(__file__).resolve().parents[2]
BDEXP = [sys.executable, "-m", "bdexp"]
REPORT = [sys.executable, "-m", "bdexp.report.cli"]
BOX = re.compile(r"[┏┃┡│└━─]")
LOG_LINE = re.compile(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d (INFO|WARNING|ERROR) {2,}\S")


def _run(cmd, cwd, columns=None, timeout=300):
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    if columns:
        env["COLUMNS"] = str(columns)
    return subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def sweep(tmp_path_factory):
    """A two-job sweep `-m attack.target=0,1` (one epoch, AC and SS), run once for the module."""
    root = tmp_path_factory.mktemp("sweep")
    args = with_tiny("train.epochs=1", "defense=[ac,ss]", "cache.enabled=false", "progress=true")
    res = _run([*BDEXP, "-m", *args, "attack.target=0,1", f"hydra.sweep.dir={root / 's'}"], root, columns=80)
    assert res.returncode == 0, res.stderr[-3000:]
    return root / "s", res


def _copy(sweep_dir: Path, dst: Path) -> Path:
    shutil.copytree(sweep_dir, dst)
    return dst


def _snapshot(d: Path) -> dict[str, tuple[int, bytes]]:
    return {str(p.relative_to(d)): (p.stat().st_mtime_ns, p.read_bytes()) for p in sorted(d.rglob("*")) if p.is_file()}


def _read_only(d: Path, monkeypatch) -> None:
    """chmod -R a-w; as root (where chmod does not stop writes) os.access is made to answer from
    the permission bits, which is what it does for any other user."""
    for p in [d, *d.rglob("*")]:
        p.chmod(p.stat().st_mode & ~(stat.S_IWUSR | stat.S_IWGRP | stat.S_IWOTH))
    if os.geteuid() == 0:
        real = os.access

        def access(path, mode, *a, **k):
            if mode & os.W_OK and Path(path).exists() and not Path(path).stat().st_mode & 0o222:
                return False
            return real(path, mode, *a, **k)

        monkeypatch.setattr(os, "access", access)


def _bas(d: Path) -> list[str]:
    """Each run's BA as the printed tables show it (three decimals)."""
    out = []
    for path in sorted(d.rglob("results.json")):
        payload = json.loads(path.read_text())
        out += [f"{r['value']:.3f}" for r in payload["metrics"] if r["metric"] == "ba" and not r.get("defense")
                and not r.get("analysis")]
    return out


def _unlock(d: Path) -> None:
    for p in [d, *d.rglob("*")]:
        p.chmod(p.stat().st_mode | stat.S_IWUSR)


def _main(argv, capsys, columns=80, monkeypatch=None):
    monkeypatch.setenv("COLUMNS", str(columns))
    try:
        report_cli.main([str(a) for a in argv])
        code = 0
    except SystemExit as exit_:
        code = exit_.code
    out = capsys.readouterr()
    return code, out.out, out.err


def test_report_on_a_read_only_sweep_prints_the_tables_and_says_where(sweep, tmp_path, capsys, monkeypatch):
    d = _copy(sweep[0], tmp_path / "ro")
    before = _snapshot(d)
    _read_only(d, monkeypatch)
    try:
        code, out, err = _main([d], capsys, monkeypatch=monkeypatch)
        assert code == 0
        assert "runs" in out and all(ba in out for ba in _bas(d))  # the table itself, with its BA cells
        lines = [ln for ln in err.splitlines() if ln.strip()]
        assert len(lines) == 1 and str(d) in lines[0] and "--out" in lines[0] and "not writable" in lines[0]
        assert "Traceback" not in err
        # --out elsewhere works from the read-only sweep
        code, out, err = _main([d, "--out", tmp_path / "rep", "--table", "all"], capsys, monkeypatch=monkeypatch)
        assert code == 0 and err == "" and (tmp_path / "rep" / "runs.md").exists()
        assert (tmp_path / "rep" / "report.md").exists()
    finally:
        _unlock(d)
    assert _snapshot(d) == before  # nothing written into the sweep


def test_a_write_error_that_access_did_not_see_still_prints(sweep, tmp_path, capsys, monkeypatch):
    """A read-only mount seen only at write time (os.access says yes): the OSError path."""
    d = _copy(sweep[0], tmp_path / "mnt")
    before = _snapshot(d)

    def refuse(*a, **k):
        raise PermissionError(13, "Read-only file system")

    monkeypatch.setattr(report_cli, "write_table", refuse)
    for table in ("runs", "all"):
        code, out, err = _main([d, "--table", table], capsys, monkeypatch=monkeypatch)
        assert code == 0 and "Traceback" not in err
        assert "target" in out and all(ba in out for ba in _bas(d))
        lines = [ln for ln in err.splitlines() if ln.strip()]
        assert len(lines) == 1 and "Read-only file system" in lines[0] and str(d) in lines[0]
    assert _snapshot(d) == before


def test_a_results_json_path_is_accepted(sweep, tmp_path):
    d = _copy(sweep[0], tmp_path / "one")
    res = _run([*REPORT, str(d / "1" / "results.json")], tmp_path, columns=80)
    assert res.returncode == 0 and "Traceback" not in res.stderr, res.stderr[-2000:]
    assert "1 complete run(s)" in res.stdout
    assert (d / "1" / "runs.md").exists()  # beside the file, not inside it
    assert (d / "1" / "results.json").read_text().startswith("{")


def test_every_table_fits_80_columns_and_the_runs_table_tells_the_targets_apart(sweep, tmp_path):
    d = _copy(sweep[0], tmp_path / "w")
    res = _run([*REPORT, str(d), "--table", "all", "--out", str(tmp_path / "rep")], tmp_path, columns=80)
    assert res.returncode == 0 and "Traceback" not in res.stderr, res.stderr[-2000:]
    res = _run([*REPORT, str(d), "--out", str(tmp_path / "rep")], tmp_path, columns=80)
    out = res.stdout
    # table lines within 80 columns, no cell cut; a path on its own line is left whole for copying
    assert "…" not in out and max(len(ln) for ln in out.splitlines() if BOX.search(ln)) <= 80, out
    # the runs table: an attack.target column whose rows read 0 and 1 (the only key the sweep varied)
    header = next(ln for ln in out.splitlines() if "┃" in ln and "ba" in ln)
    names = [c.strip() for c in header.strip("┃").split("┃")]
    rows = [[c.strip() for c in ln.strip("│").split("│")] for ln in out.splitlines() if ln.startswith("│")]
    assert "attack.target" in names
    assert sorted(r[names.index("attack.target")] for r in rows) == ["0", "1"]
    # every wide table of --table all, printed where the report cannot write, fits as well
    wide = _run([sys.executable, "-c", "import sys, bdexp.report.cli as c; c.writable = lambda out: False; "
                 "c.main(sys.argv[1:])", str(d), "--table", "all"], tmp_path, columns=80)
    assert wide.returncode == 0, wide.stderr[-2000:]
    assert "f1_levels" in wide.stdout and "…" not in wide.stdout
    assert max(len(ln) for ln in wide.stdout.splitlines() if BOX.search(ln)) <= 80, wide.stdout
    # the tables the sweep printed at the end of each run, too
    tables = [ln for ln in sweep[1].stdout.splitlines() if BOX.search(ln)]
    assert tables and "…" not in sweep[1].stdout and max(len(ln) for ln in tables) <= 80


def test_the_distances_table_fits_80_columns(capsys, monkeypatch):
    from bdexp.report.summary import print_summary

    monkeypatch.setenv("COLUMNS", "80")
    run = dict(dataset="digits", model="convnet", attack="interpolation", attack_mode="all_to_one",
               train="standard", seed=0, device="cpu", wall_s=1.0, model_cache="hit")
    metrics = [{"metric": "ba", "value": 0.9}, {"metric": "asr", "value": 0.5}]
    for lv in ("s1", "s2", "s3"):
        metrics += [{"metric": m, "value": 0.123, "analysis": "distances", "level": lv, "pair": p}
                    for m in ("mmd2", "ed2", "swd1", "aro") for p in ("malicious", "intra", "inter")]
    print_summary(run, metrics)
    out = capsys.readouterr().out
    assert "…" not in out and max(len(ln) for ln in out.splitlines()) <= 80, out
    assert "mmd2 intra" in out and "swd1 inter" in out  # whole labels, not "mmd…"


def test_skipped_pools_are_one_warning_with_a_count_and_every_line_is_said_once(tmp_path):
    args = [*with_tiny("train.epochs=1", "attack=none", "defense=[ac,ss]", "cache.enabled=false"),
            f"hydra.run.dir={tmp_path / 'run'}"]
    res = _run([*BDEXP, *args], tmp_path, columns=80)
    assert res.returncode == 0 and "Traceback" not in res.stderr, res.stderr[-3000:]
    text = res.stdout + res.stderr
    for name in ("ac", "ss"):
        warned = [ln for ln in text.splitlines() if f"{name}: skip" in ln]
        assert len(warned) == 1, text
        assert "skipped all 3 pools: attack 'none' has no backdoor test set" in warned[0]  # one pool a level: N, r′ give the same images
    assert "skipping level" not in text
    assert "train: 1 epoch in" in text and "1 epochs" not in text
    assert sum("256 train" in ln for ln in text.splitlines()) == 1  # the dataset line once
    # one format: every log line on the console and in the job's log file
    logs = [ln for ln in res.stderr.splitlines() if re.match(r"^\S*\d\d:\d\d", ln) or "INFO" in ln]
    assert logs and all(LOG_LINE.match(ln) for ln in logs), logs
    assert not any(LOG_LINE.match(ln) for ln in res.stdout.splitlines())  # stdout carries results only
    file_lines = (tmp_path / "run" / "cli.log").read_text().splitlines()
    assert file_lines and all(LOG_LINE.match(ln) for ln in file_lines), file_lines
    # a rerun of a complete run says "skipped" once
    again = _run([*BDEXP, *args], tmp_path, columns=80)
    assert again.returncode == 0
    assert sum("skipped" in ln for ln in (again.stdout + again.stderr).splitlines()) == 1, again.stdout


def test_hydra_sweep_lines_share_the_log_format(sweep):
    lines = [ln for ln in sweep[1].stderr.splitlines() if "Launching" in ln or "#0 :" in ln or "#1 :" in ln]
    assert len(lines) == 3 and all(LOG_LINE.match(ln) for ln in lines), lines
    assert "[HYDRA]" not in sweep[1].stdout + sweep[1].stderr


@pytest.mark.parametrize("argv,says", [(["{tmp}/nowhere"], "does not exist"),
                                       (["{sweep}", "--table", "nope"], "choose all or one of")])
def test_report_user_errors_are_one_line_on_stderr(argv, says, sweep, tmp_path, capsys, monkeypatch):
    argv = [a.format(tmp=tmp_path, sweep=sweep[0]) for a in argv]
    code, out, err = _main(argv, capsys, monkeypatch=monkeypatch)
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert code == 2 and out == "" and len(lines) == 1 and says in lines[0] and "Traceback" not in err


def test_a_single_run_prints_its_keys_on_a_line_and_its_values_in_a_table():
    """One row whose keys overflow 80 columns: the keys go to one "run:" line, the table keeps the
    values whole (it was split into column groups that repeated every key)."""
    from bdexp.report.summary import fit_tables

    headers = ["dataset", "model", "attack", "attack_mode", "train", "seed", "run_dir", "ba", "asr", "tmr"]
    row = ["digits", "convnet", "watermark", "one_to_one", "standard", "0", ".", "1.000", "0.972", "0.500"]
    lines, tables = fit_tables(headers, [row], 7, "runs", 40)
    assert lines == ["run: dataset digits, model convnet, attack watermark, attack_mode one_to_one, "
                     "train standard, seed 0, run_dir ."]
    assert len(tables) == 1 and [c.header for c in tables[0].columns] == ["ba", "asr", "tmr"]
