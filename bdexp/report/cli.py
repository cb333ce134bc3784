"""`bdexp-report DIR [--out OUT] [--table NAME|all]`: tables from every results.json under DIR.

`--table all` renders every table (and plot) that has records under DIR and writes a one-page
`report.md` linking them. Each table ends with its provenance: the runs and sweep directories it
comes from, failed jobs, the seeds and how they were aggregated, the bdexp version(s). With several
seeds the markdown cells read "mean ± std" (std over seeds, also written as NAME_std.csv).
"""
from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

import pandas as pd

import bdexp
from bdexp.console import console
from bdexp.errors import BdexpError
from bdexp.progress import log_formatter
from bdexp.report.collect import UNREADABLE_STATUS, collect, find_results, run_statuses
from bdexp.report.render import write_report_index, write_table
from bdexp.report.summary import print_frame, print_width
from bdexp.report.tables import PLOTS, TABLES
from bdexp.registry import import_submodules
import bdexp.report as _report_pkg

# every module of bdexp/report registers its paper layouts (one file per paper, no list to edit)
import_submodules(_report_pkg.__name__, _report_pkg.__path__)

# Tables that aggregate seeds themselves (medians, success counts) or list runs one by one.
NO_SEED_SPREAD = {"runs", "ispl_detail", "ispl_summary"}


def seed_spread(table: str, frame: pd.DataFrame, mean: pd.DataFrame) -> pd.DataFrame | None:
    """Std over seeds of every cell of `mean`: the table computed per seed, then stacked."""
    seeds = sorted(frame["seed"].dropna().unique().tolist()) if "seed" in frame else []
    if table in NO_SEED_SPREAD or len(seeds) < 2:
        return None
    # text cells (row markers, "n/a (threat models differ)") have no spread: NaN in the per-seed tables
    parts = [TABLES.get(table)(frame[frame["seed"] == s]).apply(pd.to_numeric, errors="coerce") for s in seeds]
    parts = [p for p in parts if not p.empty]
    if len(parts) < 2:
        return None
    if any(list(p.index.names) != list(mean.index.names) for p in parts):
        # A case key constant within one seed's runs (a case that has only some of the seeds) drops
        # out of that seed's table: its rows cannot be matched to the full table's without guessing
        # which case they are, so no spread is shown rather than one that mixes two cases.
        return None
    stacked = pd.concat(parts, keys=range(len(parts)), names=["_seed"])
    std = stacked.groupby(level=list(range(1, stacked.index.nlevels)), dropna=False).std()
    return std.reindex(index=mean.index, columns=mean.columns)


def provenance(directory: Path, frame: pd.DataFrame, statuses: dict[str, list[str]]) -> str:
    seeds = sorted(frame["seed"].dropna().unique().tolist()) if "seed" in frame else []
    versions = sorted({str(v) for v in frame.get("bdexp_version", pd.Series(dtype=str)).dropna()}) or [bdexp.__version__]
    sweeps = sorted({str(Path(d).parent) for d in frame["run_dir"].unique()}) if "run_dir" in frame else [str(directory)]
    done = len(statuses.get("complete", []))
    text = (f"Provenance: {done} complete run(s) under {directory} (sweep dirs: {', '.join(sweeps)}); "
            f"seeds {seeds} ({'mean ± std over seeds' if len(seeds) > 1 else 'one seed'}); "
            f"bdexp {', '.join(versions)}.")
    failed = statuses.get("failed", [])
    if failed:
        text += f" {len(failed)} failed job(s) not in the table: {', '.join(failed)} (their results.json holds the error)."
    skipped = statuses.get(UNREADABLE_STATUS, [])
    if skipped:
        text += (f" {len(skipped)} unreadable results.json skipped: {', '.join(skipped)} (the warnings on stderr "
                 "say why).")
    interrupted = statuses.get("interrupted", [])
    if interrupted:
        text += f" {len(interrupted)} interrupted run(s) skipped: {', '.join(interrupted)} (re-run to complete them)."
    return text


def out_problem(out: Path) -> str | None:
    """Why `out` can never be the directory --out names (it, or a folder it would be made in, is a
    file, a broken link or some other non-directory); None when it can. A directory that exists
    but refuses writes is `writable`'s case."""
    out = Path(out)
    for probe in (out, *out.parents):
        if probe.is_symlink() and not probe.exists():
            reason = "a broken symbolic link"
        elif not probe.exists():
            continue
        elif probe.is_dir():
            return None
        else:
            reason = "a file" if probe.is_file() else "not a directory"
        return f"{out} is {reason}" if probe == out else f"{out} lies under {probe}, which is {reason}"
    return None


def writable(out: Path) -> bool:
    """Whether `out` (a directory, made if missing) can take files: it or its nearest existing
    parent is a writable directory. os.access answers for root too, where a read-only mount is
    the only refusal; write errors are caught as well (see report)."""
    probe = Path(out)
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    return probe.is_dir() and os.access(probe, os.W_OK | os.X_OK)


def short_run_dirs(df: pd.DataFrame, base: Path) -> tuple[pd.DataFrame, str]:
    """`df` with its run_dir index level relative to `base` for printing ("0", "1" instead of the
    sweep path in every row), and the line that says so."""
    if "run_dir" not in (df.index.names or []):
        return df, ""
    base = Path(base).resolve()

    def rel(d: str) -> str:
        try:
            return str(Path(d).resolve().relative_to(base)) or "."
        except ValueError:
            return d

    level = df.index.names.index("run_dir")
    values = [rel(str(v)) for v in df.index.get_level_values(level)]
    shown = df.copy()
    if isinstance(df.index, pd.MultiIndex):
        shown.index = pd.MultiIndex.from_arrays(
            [values if i == level else df.index.get_level_values(i) for i in range(df.index.nlevels)],
            names=df.index.names)
    else:
        shown.index = pd.Index(values, name="run_dir")
    return shown, f"run_dir: under {base}"


def render_one(table: str, frame: pd.DataFrame, out: Path | None, footer: str, quiet: bool = False,
               base: Path | None = None, provenance_shown: bool = True) -> tuple[pd.DataFrame, dict[str, Path]]:
    """The table `table` of `frame`, written to `out` (nothing written when `out` is None) and
    printed unless `quiet` (with its notes, and the provenance `footer` if `provenance_shown`);
    returns the table and the files written."""
    df = TABLES.get(table)(frame)
    if df.empty:
        return df, {}
    notes = df.attrs.get("notes", [])
    footer = "\n\n".join([*notes, footer])  # the table's own notes first
    written: dict[str, Path] = {}
    if out is not None:
        std = seed_spread(table, frame, df)
        written = write_table(df, out, table, footer, std=std)
        if table in PLOTS:
            for i, png in enumerate(PLOTS.get(table)(frame, out)):
                written[f"png{i or ''}"] = png
    if not quiet:
        shown, where = short_run_dirs(df, base) if base is not None else (df, "")
        if where:
            console.print(where, width=print_width(), soft_wrap=True)
        print_frame(shown, table)
        text = footer if provenance_shown else "\n\n".join(notes)
        if text:
            console.print(text, width=print_width())
        for kind, path in written.items():
            console.print(f"  {kind}: {path}", width=print_width(), soft_wrap=True)
    return df, written


def _not_written(out: Path, err: str = "not writable") -> None:
    print(f"bdexp-report: {out} is {err}; tables printed only, no files written "
          "(pass --out DIR to write them elsewhere)", file=sys.stderr)


def report(directory: Path, out: Path | None, table: str) -> dict:
    """Tables from every results.json under `directory` (a run or sweep directory, or one
    results.json), printed and written to `out` (default: the directory, or the file's folder).
    Where `out` cannot be written the tables are printed and a line on stderr says where they would
    have gone; the return value then holds no paths."""
    if not Path(directory).exists():
        raise BdexpError(f"{directory} does not exist; pass a run or sweep directory (e.g. outputs/multirun/<date>/<time>)")
    if out is not None and (problem := out_problem(Path(out))) is not None:
        raise BdexpError(f"--out: {problem}; --out names the directory the tables are written to (made if "
                         "missing): pass a directory path")
    paths = find_results(directory)
    if not paths:
        raise BdexpError(f"no results.json under {directory}; run `bdexp` first or point at its output directory")
    frame = collect(directory)
    statuses = run_statuses(paths)
    if frame.empty:
        raise BdexpError(f"no metric records under {directory}: {len(statuses.get('failed', []))} failed run(s) (see "
                         f"the error in their results.json), {len(statuses.get(UNREADABLE_STATUS, []))} unreadable "
                         "results.json skipped (the warnings above say why)")
    if table != "all" and table not in TABLES:
        raise BdexpError(f"unknown table {table!r}; choose all or one of: {', '.join(TABLES.names())}")
    footer = provenance(Path(directory), frame, statuses)
    base = Path(directory) if Path(directory).is_dir() else Path(directory).parent
    out = Path(out) if out is not None else base
    target: Path | None = out if writable(out) else None
    if target is None:
        _not_written(out)
    if table != "all":
        try:
            df, written = render_one(table, frame, target, footer, base=base)
        except OSError as err:  # a read-only mount or a full disk that os.access did not see
            _not_written(out, f"not writable ({err.strerror or err})")
            df, written = render_one(table, frame, None, footer, base=base)
        if df.empty:
            raise BdexpError(f"no records for table {table!r} under {directory}: {TABLES.get(table).__doc__.strip()}")
        return written
    every: dict[str, dict[str, Path]] = {}
    shown: list[str] = []
    for name in TABLES.names():
        try:
            try:
                df, written = render_one(name, frame, target, footer, quiet=target is not None, base=base,
                                         provenance_shown=False)
            except OSError as err:
                _not_written(out, f"not writable ({err.strerror or err})")
                target = None
                df, written = render_one(name, frame, None, footer, base=base, provenance_shown=False)
        except Exception as err:  # one broken layout must not cost the others; say which and why
            console.print(f"[yellow]table {name} failed: {type(err).__name__}: {err}[/]", width=print_width())
            continue
        if not df.empty:
            shown.append(name)
        if written:
            every[name] = written
    console.print(f"{len(shown)} table(s) with records: {', '.join(shown)}", width=print_width())
    console.print(footer, width=print_width())
    if target is None or not every:
        return {}
    index = write_report_index(out, every, {n: (TABLES.get(n).__doc__ or "").strip().splitlines()[0] for n in every},
                               footer)
    console.print(f"  report: {index}", width=print_width(), soft_wrap=True)
    return {"report": index, **{f"{n}:{k}": p for n, w in every.items() for k, p in w.items()}}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="bdexp-report", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("directory", type=Path,
                        help="a run or sweep directory holding results.json files, or one results.json")
    parser.add_argument("--out", type=Path, default=None,
                        help="where tables go (default: DIRECTORY, or the folder of a results.json)")
    parser.add_argument("--table", default="runs", help=f"table layout: all, {', '.join(TABLES.names())}")
    args = parser.parse_args(argv)
    # warnings (e.g. an unreadable results.json skipped) on stderr in bdexp's log format
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(log_formatter())
    logging.basicConfig(level=logging.WARNING, handlers=[handler])
    try:
        report(args.directory, args.out, args.table)
    except BdexpError as err:  # a user error: one line on stderr, results stay on stdout
        print("bdexp-report error: " + " ".join(str(err).split()), file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
