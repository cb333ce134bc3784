"""The cross-paper matrix (`--table matrix`): for every (attack, training regime), how
well each detector bdexp has catches the backdoor — the table none of the papers has: does
ML-MMDR, built to beat difference-based detectors, also evade CD, the overlap detector and ISPL?

Cells (one number per detector, mean over seeds):
  - BA, ASR: the model's own clean accuracy and attack success rate (context);
  - pool detectors (every defense registered as kind "pool_detector" with AUROC records on
    ML-MMDR's test-time screening pools, §6.1: AC, SS, SR, ...): AUROC at the last conv stage
    `s3`, averaged over the pools (N, r′) formed;
  - input detectors (kind "input_detector" with AUROC records on a named pool: CD and its
    variants, overlap, STRIP, Mahalanobis, MSP, energy; OVL §III-D3): AUROC on the backdoor test
    set (pool "test", OVL's setting);
  - sanitizers (kind "sanitizer" with the sanitizer protocol's A/FP records, but ND and Oracle:
    ISPL, ITLM, SS/AC as training-set sanitizers; ISPL §4): the TMR (or ASR) of the model
    retrained on what the sanitizer kept — lower is better there, higher AUROC elsewhere;
  - repair defenses (kinds "mitigation" and "training_time", tables.repair_names: FT, FP, NAD,
    ANP, i-BAU, RNP, SAU, FT-SAM, ABL; bdexp/defenses/repair.py): "<name> ASR", the ASR of the
    repaired model (lower is better), and "<name> DER", its defense effectiveness rating against
    the run's own model (0.5: nothing changed; higher is better) — does the regime's backdoor
    survive repair?
Each kind's columns follow in name order (the repair defenses in tables.REPAIR_ORDER), every
defense the records hold (tables.defense_kind; a name the registry does not know goes where its
records' shape puts it).
Rows also split on every other swept key (tables.case_keys). Runs whose ASR is below
tables.LEARNT_MIN credit no detector or repair (their cells leave them out, column "undefended
attack" marks the row). A sanitizer or training-time defense whose threat model does not compose
with the run's training regime (record `threat_model_conflict`) reads CONFLICT instead of a number.
"""
from __future__ import annotations

import pandas as pd

from bdexp.report.detect import method_labels
from bdexp.report.tables import (INPUT_DETECTOR, MARK_COLUMN, POOL_DETECTOR, REFERENCES, SANITIZER, TABLES, add_note,
                                 conflicting, learnt_runs, of_kind, pivot_mean, repair_names, select)

POOL_LEVEL = "s3"  # ML-MMDR's headline level: the last conv stage
INPUT_POOL = "test"  # the backdoor test set
ROWS = ["attack", "regime"]
CONFLICT = "n/a (threat models differ)"
CONFLICT_NOTE = (f"{CONFLICT}: the sanitizer retrains as ISPL's defender (§3.1.1: \"The defender is given only "
                 "the poisoned dataset\"), while the run's regime is an attacker's training (ML-MMDR §3.1: \"the "
                 "attacker has complete control over the training data and the training procedure\"); no "
                 "number measures both threat models at once.")
# the repair defenses' columns: the repaired model's ASR and its DER
REPAIR_METRICS = ("asr", "der")


def repair_conflict_note(names) -> str:
    """The footer line for a training-time defense's CONFLICT cells (names: the defenses)."""
    return (f"{CONFLICT} ({', '.join(sorted(names))}): a training-time defense trains its own model on the "
            "poisoned training set as the defender (bdexp/defenses/training_time.py), while the run's regime is "
            "an attacker's training (ML-MMDR §3.1: \"the attacker has complete control over the training data "
            "and the training procedure\"); no number measures both threat models at once.")


def _long(df: pd.DataFrame) -> tuple[pd.DataFrame, list[str]]:
    """Every record the matrix shows, with its `column` label, and the columns in order: BA, ASR,
    then each kind of defense (tables.defense_kind) found in the records, by name."""
    parts, order = [], []
    plain = select(df, metric=["ba", "asr"], plain=True)
    if not plain.empty:
        parts.append(plain.assign(column=plain["metric"].str.upper()))
        order += ["BA", "ASR"]
    auroc = select(df, metric="auroc")
    if not auroc.empty and "N" in auroc and "level" in auroc:  # the screening pools
        pool = of_kind(auroc[auroc["N"].notna() & (auroc["level"] == POOL_LEVEL)], POOL_DETECTOR)
        parts.append(pool.assign(column=pool["defense"] + f" {POOL_LEVEL}"))
        order += [f"{d} {POOL_LEVEL}" for d in sorted(set(pool["defense"]))]
    if not auroc.empty and "pool" in auroc:  # the input detectors
        inputs = of_kind(auroc[auroc["pool"] == INPUT_POOL], INPUT_DETECTOR)
        inputs = inputs.assign(column=method_labels(inputs))
        parts.append(inputs)
        order += sorted(set(inputs["column"]))
    protocol = of_kind(select(df, metric=["a", "fp"]), SANITIZER)  # the sanitizer protocol (defenses/sanitize.py)
    names = sorted(set(protocol["defense"].dropna()) - set(REFERENCES)) if not protocol.empty else []
    sanit = select(df, metric="a", defense=names)
    if sanit.empty:
        sanit = select(df, metric="asr", defense=names)
    if not sanit.empty:  # (a frame with no defense records has no `defense` column)
        parts.append(sanit.assign(column=sanit["defense"] + " TMR"))
    order += [f"{s} TMR" for s in names]
    repair = repair_names(df)
    fixed = select(df, metric=list(REPAIR_METRICS), defense=repair)
    if not fixed.empty:
        parts.append(fixed.assign(column=fixed["defense"] + " " + fixed["metric"].str.upper()))
    order += [f"{d} {m.upper()}" for d in repair for m in REPAIR_METRICS]
    parts = [p for p in parts if not p.empty]
    return (pd.concat(parts) if parts else pd.DataFrame()), order


@TABLES.register("matrix")
def matrix_table(df: pd.DataFrame) -> pd.DataFrame:
    """Attack × regime rows; BA, ASR, then AUROC per detector, TMR per sanitizer and ASR / DER per
    repair defense."""
    rows, order = _long(df)
    if rows.empty or set(rows["column"]) <= {"BA", "ASR"}:
        return pd.DataFrame()
    conflict = select(df, metric="threat_model_conflict")
    conflict = conflict[conflict["value"] > 0]
    repair = set(repair_names(df))
    fixed = conflicting(df, repair)
    conflict = conflict[~conflict["defense"].isin(repair)] if not conflict.empty else conflict
    # a conflicting run puts +inf into its sanitizer's (repair defense's) cells, so the cell's mean
    # is inf whatever else it holds; no AUROC, TMR, ASR or DER is infinite
    marks = [conflict.assign(column=conflict["defense"] + " TMR", value=float("inf"))]
    if not fixed.empty:
        runs = select(df, defense=sorted(repair), metric=list(REPAIR_METRICS)).merge(fixed, on=["run_dir", "defense"])
        marks.append(runs.assign(column=runs["defense"] + " " + runs["metric"].str.upper(), value=float("inf")))
    rows = pd.concat([rows, *marks])
    table = pivot_mean(rows, ROWS, ["column"], learnt=learnt_runs(df, "asr"), drop_constant=False)
    table = table[[c for c in order if c in table.columns] + [c for c in table.columns if c == MARK_COLUMN]]
    table.columns.name = None
    hit = table.isin([float("inf")])
    if hit.any().any():
        table = table.astype(object).mask(hit, CONFLICT)
        shown = {c.rsplit(" ", 1)[0] for c in table.columns[hit.any()]}
        if shown - repair:
            add_note(table, CONFLICT_NOTE)
        if shown & repair:
            add_note(table, repair_conflict_note(shown & repair))
    return table
