"""The cross-paper matrix (issue 7, `--table matrix`): for every (attack, training regime), how
well each detector bdexp has catches the backdoor — the table none of the papers has: does
ML-MMDR, built to beat difference-based detectors, also evade CD, the overlap detector and ISPL?

Cells (one number per detector, mean over seeds):
  - BA, ASR: the model's own clean accuracy and attack success rate (context);
  - AC, SS, SR (ML-MMDR's test-time screening pools, SPEC §5.1–5.3): AUROC at the last conv stage
    `s3`, averaged over the pools (N, r′) that could be formed;
  - input detectors (CD and its variants, overlap, STRIP, Mahalanobis, MSP, energy; SPEC §5.5–5.7):
    AUROC on the backdoor test set (pool "test", OVL's setting);
  - sanitizers (ISPL, ITLM, SS/AC as training-set sanitizers; SPEC §5.4): the TMR (or ASR) of the
    model retrained on what the sanitizer kept — lower is better there, higher AUROC elsewhere.
"""
from __future__ import annotations

import pandas as pd

from bdexp.report.tables import TABLES, select

POOL_DETECTORS = ["ac", "ss", "sr"]
INPUT_DETECTORS = ["cd", "cd_probs", "cd_feature", "overlap", "strip", "mahalanobis", "msp", "energy"]
SANITIZERS = ["ispl", "itlm", "ss_train", "ac_train"]
POOL_LEVEL = "s3"  # ML-MMDR's headline level: the last conv stage
INPUT_POOL = "test"  # the backdoor test set


def _column(rows: pd.DataFrame, suffix: str) -> pd.DataFrame:
    if rows.empty:
        return pd.DataFrame()
    rows = rows.assign(column=rows["defense"] + suffix)
    return rows.pivot_table(index=["attack", "regime"], columns="column", values="value", aggfunc="mean")


@TABLES.register("matrix")
def matrix_table(df: pd.DataFrame) -> pd.DataFrame:
    """Attack × regime rows; BA, ASR, then AUROC per detector and TMR per sanitizer."""
    parts = []
    plain = select(df, metric=["ba", "asr"], plain=True)
    if not plain.empty:
        parts.append(plain.assign(column=plain["metric"].str.upper())
                     .pivot_table(index=["attack", "regime"], columns="column", values="value", aggfunc="mean"))
    pool = select(df, metric="auroc", defense=POOL_DETECTORS)
    if not pool.empty and "level" in pool:
        parts.append(_column(pool[pool["level"] == POOL_LEVEL], f" {POOL_LEVEL}"))
    inputs = select(df, metric="auroc", defense=INPUT_DETECTORS)
    if not inputs.empty and "pool" in inputs:
        parts.append(_column(inputs[inputs["pool"] == INPUT_POOL], ""))
    sanit = select(df, metric="a", defense=SANITIZERS)
    if sanit.empty:
        sanit = select(df, metric="asr", defense=SANITIZERS)
    parts.append(_column(sanit, " TMR"))
    parts = [p for p in parts if not p.empty]
    if not parts or all(p.columns.tolist() in (["BA", "ASR"], ["ASR", "BA"], ["BA"]) for p in parts):
        return pd.DataFrame()
    table = pd.concat(parts, axis=1)
    order = ["BA", "ASR"] + [f"{d} {POOL_LEVEL}" for d in POOL_DETECTORS] + INPUT_DETECTORS + [f"{s} TMR" for s in SANITIZERS]
    table = table[[c for c in order if c in table.columns]]
    table.columns.name = None
    return table
