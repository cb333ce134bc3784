"""Paper layouts as pivots of the long-format frame; `--table NAME` picks one."""
from __future__ import annotations

import pandas as pd

from bdexp.registry import Registry

# name -> function(long_frame) -> DataFrame
TABLES: Registry = Registry("table")

RUN_INDEX = ["dataset", "model", "attack", "attack_mode", "train", "seed"]


@TABLES.register("runs")
def runs_table(df: pd.DataFrame) -> pd.DataFrame:
    """BA / ASR / TMR per run (model-level metrics: records without defense/analysis tags)."""
    plain = df
    for tag in ("defense", "analysis"):
        if tag in plain:
            plain = plain[plain[tag].isna()]
    plain = plain[plain["metric"].isin(["ba", "asr", "tmr"])]
    table = plain.pivot_table(index=RUN_INDEX + ["run_dir"], columns="metric", values="value",
                              aggfunc="first", dropna=False)
    table = table.dropna(how="all")
    table.columns.name = None
    return table[[c for c in ("ba", "asr", "tmr") if c in table.columns]]
