"""`bdexp-report DIR [--out OUT] [--table NAME|all]`: tables from every results.json under DIR.

`--table all` renders every table (and plot) that has records under DIR and writes a one-page
`report.md` linking them. Each table ends with its provenance: the runs and sweep directories it
comes from, failed jobs, the seeds and how they were aggregated, the bdexp version(s). With several
seeds the markdown cells read "mean ± std" (std over seeds, also written as NAME_std.csv).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import pandas as pd

import bdexp
from bdexp.console import console
from bdexp.errors import BdexpError
from bdexp.report.collect import collect, find_results, run_statuses
from bdexp.report.render import write_report_index, write_table
from bdexp.report.summary import print_frame
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
    return text


def render_one(table: str, frame: pd.DataFrame, out: Path, footer: str, quiet: bool = False) -> dict[str, Path]:
    df = TABLES.get(table)(frame)
    if df.empty:
        return {}
    footer = "\n\n".join([*df.attrs.get("notes", []), footer])  # the table's own notes first
    std = seed_spread(table, frame, df)
    written = write_table(df, out, table, footer, std=std)
    if table in PLOTS:
        for i, png in enumerate(PLOTS.get(table)(frame, out)):
            written[f"png{i or ''}"] = png
    if not quiet:
        print_frame(df, f"{table}")
        console.print(footer)
        for kind, path in written.items():
            console.print(f"  {kind}: {path}")
    return written


def report(directory: Path, out: Path | None, table: str) -> dict:
    if not Path(directory).exists():
        raise BdexpError(f"{directory} does not exist; pass a run or sweep directory (e.g. outputs/multirun/<date>/<time>)")
    paths = find_results(directory)
    if not paths:
        raise BdexpError(f"no results.json under {directory}; run `bdexp` first or point at its output directory")
    frame = collect(directory)
    statuses = run_statuses(paths)
    if frame.empty:
        raise BdexpError(f"no metric records under {directory}: {len(statuses.get('failed', []))} failed run(s); "
                         "see the error in their results.json")
    footer = provenance(Path(directory), frame, statuses)
    out = Path(out or directory)
    if table != "all":
        written = render_one(table, frame, out, footer)
        if not written:
            raise BdexpError(f"no records for table {table!r} under {directory}: {TABLES.get(table).__doc__.strip()}")
        return written
    every: dict[str, dict[str, Path]] = {}
    for name in TABLES.names():
        try:
            written = render_one(name, frame, out, footer, quiet=True)
        except Exception as err:  # one broken layout must not cost the others; say which and why
            console.print(f"[yellow]table {name} failed: {type(err).__name__}: {err}[/]")
            continue
        if written:
            every[name] = written
    index = write_report_index(out, every, {n: (TABLES.get(n).__doc__ or "").strip().splitlines()[0] for n in every},
                               footer)
    console.print(f"{len(every)} table(s) with records: {', '.join(every)}")
    console.print(footer)
    console.print(f"  report: {index}")
    return {"report": index, **{f"{n}:{k}": p for n, w in every.items() for k, p in w.items()}}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="bdexp-report", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("directory", type=Path, help="a run or sweep directory holding results.json files")
    parser.add_argument("--out", type=Path, default=None, help="where tables go (default: DIRECTORY)")
    parser.add_argument("--table", default="runs", help=f"table layout: all, {', '.join(TABLES.names())}")
    args = parser.parse_args(argv)
    try:
        report(args.directory, args.out, args.table)
    except BdexpError as err:
        console.print(f"[bold red]bdexp-report error:[/] {err}")
        sys.exit(2)


if __name__ == "__main__":
    main()
