"""The compact tables printed at the end of a run (results.json holds every record) and by
bdexp-report. Every printed table fits the console width (or $COLUMNS where it is set, e.g.
`COLUMNS=80`) with no cell cut: a table too wide moves the key columns that are the same in every
row to a line above it, then is transposed if that fits, else split into column groups that repeat
the key columns; a cell that still does not fit wraps (never "…")."""
from __future__ import annotations

import os

import pandas as pd
from rich.markup import escape
from rich.measure import Measurement
from rich.table import Table

from bdexp.analysis.distances import swd1_note
from bdexp.console import console
from bdexp.options import show
from bdexp.report.tables import f1_rows


def print_width() -> int:
    """Columns available to a printed table: $COLUMNS where set (rich ignores it once the shared
    console has a fixed width for piped output), else the console's width."""
    env = os.environ.get("COLUMNS", "")
    return min(int(env), console.width) if env.isdigit() and int(env) > 0 else console.width


def _label(col) -> str:
    return " ".join(str(p) for p in col if str(p)).strip() if isinstance(col, tuple) else str(col)


def _cell(v) -> str:
    if isinstance(v, float):
        return "" if pd.isna(v) else f"{v:.3f}"
    return "" if v is None or (not isinstance(v, (list, tuple, dict)) and pd.isna(v)) else str(v)


def _table(title: str | None, headers: list[str], rows: list[list[str]]) -> Table:
    table = Table(title=title, title_justify="left")
    for h in headers:
        table.add_column(h, overflow="fold")  # wrap a long cell, never cut it to "…"
    for row in rows:
        table.add_row(*row)
    return table


def _fits(table: Table, width: int) -> bool:
    # measured unconstrained: Measurement.get clamps to the width it is given
    return Measurement.get(console, console.options.update(width=10_000), table).maximum <= width


def fit_tables(headers: list[str], rows: list[list[str]], n_keys: int, title: str,
               width: int) -> tuple[list[str], list[Table]]:
    """Lines to print above, and the tables that show `rows` (the first `n_keys` columns are keys)
    within `width` columns; see the module docstring for the order of what is tried."""
    table = _table(title, headers, rows)
    if _fits(table, width):
        return [], [table]
    lines: list[str] = []
    if rows:  # keys the same in every row go to one line above the table (one row: all of them)
        same = [i for i in range(n_keys) if len({r[i] for r in rows}) == 1]
        if same and (len(same) < n_keys or len(rows) == 1):
            lead = "run: " if len(rows) == 1 else "same in every row: "
            lines.append(lead + ", ".join(f"{headers[i]} {rows[0][i]}" for i in same))
            keep = [i for i in range(len(headers)) if i not in same]
            headers, rows = [headers[i] for i in keep], [[r[i] for i in keep] for r in rows]
            n_keys -= len(same)
            table = _table(title, headers, rows)
            if _fits(table, width):
                return lines, [table]
    # transposed: one column per row (headed by its keys), one row per value column
    t_headers = [" / ".join(headers[:n_keys]) or ""] + [" ".join(r[:n_keys]) or ("value" if len(rows) == 1 else str(i))
                                                        for i, r in enumerate(rows)]
    t_rows = [[headers[j]] + [r[j] for r in rows] for j in range(n_keys, len(headers))]
    transposed = _table(f"{title} (transposed)", t_headers, t_rows)
    if _fits(transposed, width):
        return lines, [transposed]
    # column groups that each fit, the key columns repeated in each
    groups: list[list[int]] = []
    for j in range(n_keys, len(headers)):
        trial = (groups[-1] + [j]) if groups else [j]
        cols = list(range(n_keys)) + trial
        if groups and _fits(_table(title, [headers[c] for c in cols], [[r[c] for c in cols] for r in rows]), width):
            groups[-1] = trial
        else:
            groups.append([j])
    tables = []
    for g, group in enumerate(groups):
        cols = list(range(n_keys)) + group
        part = f"{title} (columns {g + 1}/{len(groups)})" if len(groups) > 1 else title
        tables.append(_table(part, [headers[c] for c in cols], [[r[c] for c in cols] for r in rows]))
    return lines, tables


def print_frame(df: pd.DataFrame, title: str, width: int | None = None) -> None:
    """A DataFrame (index included, as the key columns) as rich table(s) within `width` columns
    (default print_width())."""
    width = width or print_width()
    flat = df.reset_index()
    headers = [_label(c) for c in flat.columns]
    rows = [[_cell(v) for v in row] for row in flat.itertuples(index=False, name=None)]
    lines, tables = fit_tables(headers, rows, df.index.nlevels, title, width)
    for line in lines:
        console.print(line, width=width, markup=False, highlight=False)
    for table in tables:
        console.print(table, width=width)


def _pivot(df: pd.DataFrame, index: list[str], columns: list[str]) -> pd.DataFrame:
    return df.pivot_table(index=index, columns=columns, values="value", aggfunc="mean")


def changed(run: dict, group: str) -> str:
    """ " (mode=one_to_one, mark='peace')": the options of `group` the run's identity holds
    (results.run_identity: those differing from the method's default); "" when none."""
    opts = [f"{key.split('.', 1)[1]}={show(value)}" for key, value in run.items() if key.startswith(f"{group}.")]
    return escape(f" ({', '.join(opts)})") if opts else ""  # a list value is no rich markup


def print_summary(run: dict, metrics: list[dict]) -> None:
    console.print(
        f"[bold]{run['dataset']} · {run['model']} · {run['attack']}{changed(run, 'attack')} · "
        f"{run['train']}{changed(run, 'train')} · seed {run['seed']} · "
        f"{run['device']} · {run['wall_s']:.1f}s · model {run['model_cache']}", width=print_width()
    )
    df = pd.DataFrame(metrics)
    for tag in ("defense", "analysis", "level", "N", "r", "pair", "prune_ratio"):
        if tag not in df:
            df[tag] = None
    plain = df[df["defense"].isna() & df["analysis"].isna()]
    print_frame(plain.set_index("metric")[["value"]].T.rename(index={"value": "test set"}).rename_axis("model"), "model")
    pools = f1_rows(df[df["N"].notna()])
    if not pools.empty:  # the detector's own rule and the best threshold, labelled (as --table f1_levels)
        print_frame(_pivot(pools.astype({"N": int}), ["defense", "f1", "level"], ["N", "r"]),
                    "detectors: F1 on the screening pools (columns N, r′)")
    dist = df[df["analysis"].eq("distances") & df["metric"].isin(["mmd2", "ed2", "swd1", "aro"])]
    if not dist.empty:
        short = {"malicious": "mal", "intra": "intra", "inter": "inter"}
        dist = dist.assign(column=dist["metric"] + " " + dist["pair"].map(short).fillna(""))
        print_frame(_pivot(dist, ["level"], ["column"]), "distances (malicious / intra / inter) and ARO")
        if dist["metric"].eq("swd1").any():
            sizes = df.loc[df["metric"].eq("set_size") & df["analysis"].eq("distances"), "value"].dropna()
            console.print(swd1_note(sizes), width=print_width())
    nc = df[df["defense"].eq("nc") & df["metric"].isin(["target_flagged", "target_anomaly_index", "infected_l1", "uninfected_l1"])]
    if not nc.empty:
        print_frame(nc.set_index("metric")[["value"]].T.rename(index={"value": "nc"}).rename_axis("defense"), "Neural Cleanse")
    curve = df[df["defense"].eq("nc") & df["prune_ratio"].notna()]
    if not curve.empty:
        print_frame(_pivot(curve, ["metric"], ["prune_ratio"]), "pruning curve (fraction of s3 channels)")
    skipped = df[df["metric"].isin(["skipped", "aro_skipped"])]
    if not skipped.empty:  # one count per defense/analysis; the warnings above say why
        parts = [_skipped_part(name, metric, rows)
                 for (name, metric), rows in skipped.assign(name=skipped["defense"].fillna(skipped["analysis"])
                                                            .fillna("-")).groupby(["name", "metric"], sort=False)]
        console.print(f"[yellow]skipped: {', '.join(parts)} (the log says why; results.json records each)",
                      width=print_width())

def _skipped_part(name: str, metric: str, rows: pd.DataFrame) -> str:
    """"ac 12 pools" for a detector's skipped pools; ARO with its reason (no warning logs it)."""
    if metric != "aro_skipped":
        return f"{name} {plural(len(rows), 'pool')}"
    reasons = rows["reason"].dropna().unique() if "reason" in rows else []
    return "ARO" + (f" ({'; '.join(map(str, reasons))})" if len(reasons) else "")


def plural(n: int, noun: str) -> str:
    """ "1 pool", "12 pools"."""
    return f"{n} {noun}" if n == 1 else f"{n} {noun}s"
