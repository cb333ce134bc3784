"""The input-detection table (`detect`: OVL Tables II/VII, CD): rows attack × pool ×
metric (TPR95, AUROC, AUPR), one column per detector, mean over seeds.

Rows carry the pool (train = poisoned training set, test = backdoor test set) as a row level, so
the detectors stay side by side as in OVL Table VII. A detector run at several feature levels or
CD variants in one sweep gets one column per setting ("overlap s3", "cd feature").
"""
from __future__ import annotations

import pandas as pd

from bdexp.report.tables import (INPUT_DETECTOR, MARK_COLUMN, TABLES, case_labels, learnt_runs, of_kind, pivot_mean,
                                 select)

METRICS = ["tpr95", "auroc", "aupr"]  # OVL §III-D2's three metrics, in its order
# OVL Table II's column order (Ours, STRIP, Mahalanobis, ..., MSP), then energy and CD; every other
# input detector in the records (tables.defense_kind) follows by name
DETECTORS = ["overlap", "strip", "mahalanobis", "msp", "energy", "cd", "cd_probs", "cd_feature"]
SETTING_TAGS = ("variant", "level")


def method_labels(rows: pd.DataFrame) -> pd.Series:
    """The defense name, plus the variant/level where one defense appears with several of them."""
    label = rows["defense"].astype(str)
    for tag in SETTING_TAGS:
        if tag not in rows:
            continue
        values = case_labels(rows[tag]).astype(str)  # a missing tag "-", True and "True" apart
        several = values.groupby(rows["defense"]).transform("nunique") > 1
        label = label.where(~several, label + " " + values)
    return label


def _order(labels: list[str], first: list[str]) -> list[str]:
    rank = {name: i for i, name in enumerate(first)}
    return sorted(labels, key=lambda s: (rank.get(s.split(" ")[0], len(rank)), s))


@TABLES.register("detect")
def detect_table(df: pd.DataFrame) -> pd.DataFrame:
    """OVL Table VII layout: attack (× mode, a case key) × pool × metric rows, one column per input
    detector in the records; runs whose ASR shows the backdoor was not learnt are left out and
    their rows marked (tables.LEARNT_MIN)."""
    rows = select(df, metric=METRICS)
    if rows.empty or "pool" not in rows:
        return pd.DataFrame()
    rows = of_kind(rows[rows["pool"].notna()], INPUT_DETECTOR).copy()
    if rows.empty:
        return pd.DataFrame()
    rows["method"] = method_labels(rows)
    table = pivot_mean(rows, ["dataset", "model", "regime", "attack", "pool", "metric"], ["method"],
                       learnt=learnt_runs(df, "asr"))
    marked = [c for c in table.columns if c == MARK_COLUMN]
    table = table[_order([c for c in table.columns if c != MARK_COLUMN], DETECTORS) + marked]
    table.columns.name = None
    # metrics in OVL's order inside each (attack, pool) block
    levels = list(table.index.names)
    keys = [table.index.get_level_values(n) for n in levels]
    order = sorted(range(len(table)), key=lambda i: tuple(
        METRICS.index(k[i]) if n == "metric" else str(k[i]) for n, k in zip(levels, keys)))
    return table.iloc[order]
