"""ISPL's tables: ispl_detail (App. D.2 Table 2) and ispl_summary (Table 1).

A case is one (ε, attack, pair) plus every key the sweep varies besides the seed (tables.case_keys:
the watermark's mark, CLBD's PGD settings, ...); each case is its seeds' median, as ISPL reports.
Runs whose undefended model did not learn the backdoor (tables.LEARNT_MIN, basis "tmr": ND's TMR)
are not credited to any defense (tables.leave_out)."""
from __future__ import annotations

import pandas as pd

from bdexp.report.collect import option_column
from bdexp.report.tables import (MARK_COLUMN, SUCCESS_TMR, TABLES, leave_out, learnt_runs, note_left_out, pivot_mean,
                                 prepare, select)

# Table 2's column order; a method absent from the sweep is left out.
METHODS = ["oracle", "nd", "ss_train", "ac_train", "itlm", "ispl"]
# Table 2's metrics, then ISPL+B's FP/FN after boosting alone (before self-training; bdexp's diagnostic).
METRICS = ["c", "a", "fp", "fn", "fp_boost", "fn_boost"]
SUMMARY_COLUMNS = ["dataset", "attack", "attack.mode"]  # Table 1's columns (dataset · attack · mode)


def _sanitizer_rows(df: pd.DataFrame) -> pd.DataFrame:
    rows = select(df, metric=METRICS, defense=METHODS)
    if rows.empty:
        return rows
    rows = rows.copy()
    # the mode and ε of each run's attack (its identity holds them where they are not the default)
    rows["attack.mode"] = option_column(rows, "attack", "mode")
    rows["eps"] = option_column(rows, "attack", "poison_rate")
    # source/target as the built attack resolved them (the pipeline records them with the run);
    # "all/T" for all-to-one (no source class), "y/y+1" for all-to-all
    source, target = (pd.to_numeric(rows[c], errors="coerce") if c in rows else pd.Series(float("nan"), index=rows.index)
                      for c in ("source", "target"))
    source = source.astype("Int64").astype(str).where(source.notna(), "all")
    target = target.astype("Int64").astype(str).where(target.notna(), "y+1")
    all_to_all = rows["attack.mode"] == "all_to_all"
    rows["pair"] = source.where(~all_to_all, "y") + "/" + target.where(~all_to_all, "y+1")
    return rows


@TABLES.register("ispl_detail")
def detail_table(df: pd.DataFrame) -> pd.DataFrame:
    """ISPL Table 2: per source/target pair and ε (and every other swept key), C / A / FP / FN of
    every method (median over seeds, as ISPL reports); rows whose undefended attack was not learnt
    are marked and their defenses' cells leave those runs out."""
    rows = _sanitizer_rows(df)
    if rows.empty:
        return pd.DataFrame()
    table = pivot_mean(rows, ["attack", "pair", "eps"], ["defense", "metric"], learnt=learnt_runs(df, "tmr"),
                       basis="tmr", aggfunc="median", drop_constant=False)
    order = [(m, k) for m in METHODS for k in METRICS if (m, k) in table.columns]
    return table[order + [c for c in table.columns if c[0] == MARK_COLUMN]]


@TABLES.register("ispl_summary")
def summary_table(df: pd.DataFrame) -> pd.DataFrame:
    """ISPL Table 1: successes / cases per ε (rows) and dataset · attack · mode (columns) for ISPL+B,
    a success being a median TMR below 1 %; every other swept key (pair, mark, ...) makes separate
    cases. Cases whose undefended attack was not learnt are not counted ("(k left out)")."""
    rows = _sanitizer_rows(df)
    rows = rows[(rows["defense"] == "ispl") & (rows["metric"] == "a")] if not rows.empty else rows
    if rows.empty:
        return pd.DataFrame()
    rows, case = prepare(rows, ["eps", *SUMMARY_COLUMNS, "pair"], [])
    rows, marks = leave_out(rows, learnt_runs(df, "tmr"), case)
    cell = ["eps", *SUMMARY_COLUMNS]
    per_case = rows.groupby(case)["value"].median().lt(SUCCESS_TMR).rename("success").reset_index()
    counts = per_case.groupby(cell)["success"].agg(["sum", "count"])
    counts["left"] = 0
    gone = [key for key, mark in marks.items() if mark.startswith("not learnt")]  # cases with no learnt run
    if gone:
        left = pd.Series(1, index=pd.MultiIndex.from_tuples(gone, names=case)).groupby(level=cell).sum()
        counts = counts.reindex(counts.index.union(left.index), fill_value=0)
        counts.index.names = cell
        counts["left"] = left.reindex(counts.index, fill_value=0)
    counts["cell"] = [f"{int(s)} / {int(n)}" + (f" ({int(k)} left out)" if k else "")
                      for s, n, k in zip(counts["sum"], counts["count"], counts["left"])]
    table = counts["cell"].unstack(SUMMARY_COLUMNS)
    return note_left_out(table, marks, "tmr", unit="case", where='"(k left out)" in the cells')
