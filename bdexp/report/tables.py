"""Paper layouts as pivots of the long-format frame; `--table NAME` picks one.

Every table is a function of the long frame (one row per metric record, tagged with its run's
identity, see collect.py). Values of repeated runs (seeds) are averaged; `seeds` in the footer
says how many went into each cell.
"""
from __future__ import annotations

from pathlib import Path

import pandas as pd

from bdexp.registry import Registry

# name -> function(long_frame) -> DataFrame
TABLES: Registry = Registry("table")
# name -> function(long_frame, out_dir) -> list of written PNG paths (optional per table)
PLOTS: Registry = Registry("plot")

RUN_INDEX = ["dataset", "model", "attack", "attack_mode", "train", "seed"]


def select(df: pd.DataFrame, *, metric=None, defense=None, analysis=None, plain: bool = False, **equal) -> pd.DataFrame:
    """Rows with the given metric(s) and tags; `plain` keeps only model-level records."""
    out = df
    if plain:
        for tag in ("defense", "analysis"):
            if tag in out:
                out = out[out[tag].isna()]
    for tag, want in (("defense", defense), ("analysis", analysis), ("metric", metric), *equal.items()):
        if want is None:
            continue
        if tag not in out:
            return out.iloc[0:0]
        out = out[out[tag].isin(want if isinstance(want, (list, tuple, set)) else [want])]
    return out


def pivot_mean(df: pd.DataFrame, index: list[str], columns: list[str], values: str = "value") -> pd.DataFrame:
    """Mean over repeated runs (seeds) of `values`, rows `index`, columns `columns`; index levels
    that are constant across the frame are dropped so tables stay narrow."""
    if df.empty:
        return pd.DataFrame()
    df = df.copy()
    for col in ("N", "prune_ratio"):  # integer-valued tags come back as floats next to NaN
        if col in df and df[col].notna().any() and (df[col].dropna() % 1 == 0).all():
            df[col] = df[col].astype("Int64")
    for col in index + columns:
        if col not in df:
            df[col] = "-"
        df[col] = df[col].fillna("-")
    table = df.pivot_table(index=index, columns=columns, values=values, aggfunc="mean")
    if isinstance(table.index, pd.MultiIndex) and table.index.nlevels > 1:
        keep = [name for name, level in zip(table.index.names, table.index.levels) if len(level) > 1]
        drop = [n for n in table.index.names if n not in keep]
        if keep and drop:
            table = table.droplevel(drop)
    return table


@TABLES.register("runs")
def runs_table(df: pd.DataFrame) -> pd.DataFrame:
    """BA / ASR / TMR per run (model-level metrics: records without defense/analysis tags)."""
    plain = select(df, metric=["ba", "asr", "tmr"], plain=True)
    table = plain.pivot_table(index=RUN_INDEX + ["run_dir"], columns="metric", values="value",
                              aggfunc="first", dropna=False)
    table = table.dropna(how="all")
    table.columns.name = None
    return table[[c for c in ("ba", "asr", "tmr") if c in table.columns]]


def save_figure(fig, out_dir: Path, name: str) -> Path:
    """Write a matplotlib figure as `out_dir/name.png` and close it; returns the path."""
    import matplotlib.pyplot as plt

    path = Path(out_dir) / f"{name}.png"
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
