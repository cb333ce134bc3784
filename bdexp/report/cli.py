"""`bdexp-report DIR [--out OUT] [--table NAME]`: tables from every results.json under DIR."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import bdexp
from bdexp.console import console
from bdexp.errors import BdexpError
from bdexp.report.collect import collect, find_results
from bdexp.report.render import write_table
from bdexp.report.summary import print_frame
from bdexp.report.tables import PLOTS, TABLES
from bdexp.registry import import_submodules
import bdexp.report as _report_pkg

# every module of bdexp/report registers its paper layouts (one file per paper, no list to edit)
import_submodules(_report_pkg.__name__, _report_pkg.__path__)


def report(directory: Path, out: Path | None, table: str) -> dict:
    if not Path(directory).exists():
        raise BdexpError(f"{directory} does not exist; pass a run or sweep directory (e.g. outputs/multirun/<date>/<time>)")
    paths = find_results(directory)
    if not paths:
        raise BdexpError(f"no results.json under {directory}; run `bdexp` first or point at its output directory")
    frame = collect(directory)
    df = TABLES.get(table)(frame)
    footer = (f"Provenance: {len(paths)} run(s) from {directory}; bdexp {bdexp.__version__}; "
              f"seeds {sorted(frame['seed'].dropna().unique().tolist())}.")
    if df.empty:
        raise BdexpError(f"no records for table {table!r} under {directory}: {TABLES.get(table).__doc__.strip()}")
    out = Path(out or directory)
    written = write_table(df, out, table, footer)
    if table in PLOTS:
        for i, png in enumerate(PLOTS.get(table)(frame, out)):
            written[f"png{i or ''}"] = png
    print_frame(df, f"{table} ({len(paths)} runs)")
    console.print(footer)
    for kind, path in written.items():
        console.print(f"  {kind}: {path}")
    return written


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="bdexp-report", description=__doc__)
    parser.add_argument("directory", type=Path, help="a run or sweep directory holding results.json files")
    parser.add_argument("--out", type=Path, default=None, help="where tables go (default: DIRECTORY)")
    parser.add_argument("--table", default="runs", help=f"table layout: {', '.join(TABLES.names())}")
    args = parser.parse_args(argv)
    try:
        report(args.directory, args.out, args.table)
    except BdexpError as err:
        console.print(f"[bold red]bdexp-report error:[/] {err}")
        sys.exit(2)


if __name__ == "__main__":
    main()
