"""ISPL's tables (SPEC §7): ispl_detail (Table 2) and ispl_summary (Table 1)."""
from __future__ import annotations

import pandas as pd

from bdexp.report.tables import TABLES, select

# Table 2's column order; a method absent from the sweep is left out.
METHODS = ["oracle", "nd", "ss_train", "ac_train", "itlm", "ispl"]
SUCCESS_TMR = 0.01  # ISPL Table 1: a defense succeeds when the TMR is below 1 %


def _sanitizer_rows(df: pd.DataFrame) -> pd.DataFrame:
    rows = select(df, metric=["c", "a", "fp", "fn"], defense=METHODS)
    if rows.empty:
        return rows
    rows = rows.copy()
    rows["pair"] = rows["source"].astype("Int64").astype(str) + "/" + rows["target"].astype("Int64").astype(str)
    rows["eps"] = rows["poison_rate"]
    return rows


@TABLES.register("ispl_detail")
def detail_table(df: pd.DataFrame) -> pd.DataFrame:
    """ISPL Table 2: per source/target pair and ε, C / A / FP / FN of every method (median over seeds,
    as ISPL reports)."""
    rows = _sanitizer_rows(df)
    if rows.empty:
        return pd.DataFrame()
    table = rows.pivot_table(index=["attack", "pair", "eps"], columns=["defense", "metric"], values="value",
                             aggfunc="median")
    order = [(m, k) for m in METHODS for k in ("c", "a", "fp", "fn") if (m, k) in table.columns]
    return table[order]


@TABLES.register("ispl_summary")
def summary_table(df: pd.DataFrame) -> pd.DataFrame:
    """ISPL Table 1: successes / total per ε (rows) and attack · mode (columns) for ISPL+B, a
    success being a median TMR below 1 %."""
    rows = _sanitizer_rows(df)
    rows = rows[(rows["defense"] == "ispl") & (rows["metric"] == "a")] if not rows.empty else rows
    if rows.empty:
        return pd.DataFrame()
    per_case = rows.groupby(["eps", "attack", "attack_mode", "pair"])["value"].median().reset_index()
    per_case["success"] = per_case["value"] < SUCCESS_TMR
    counts = per_case.groupby(["eps", "attack", "attack_mode"])["success"].agg(["sum", "count"])
    counts["cell"] = counts["sum"].astype(int).astype(str) + " / " + counts["count"].astype(str)
    return counts["cell"].unstack(["attack", "attack_mode"])
