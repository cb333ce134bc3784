"""Paper layouts as pivots of the long-format frame; `--table NAME` picks one.

Every table is a function of the long frame (one row per metric record, tagged with its run's
identity, see collect.py). Values of repeated runs (seeds) are averaged; `seeds` in the footer
says how many went into each cell.

Two rules hold in every table:
  - **cases**: a cell never merges runs that differ in anything but the seed. `case_keys` finds
    the keys of the runs' identity (results.run_identity: the methods and every option not at its
    default) and the swept config keys (collect.py) that vary inside a table's cells, and the
    table adds them as row levels (ISPL's watermark marks, CLBD's PGD settings, ...). Keys are
    compared and pivoted as `case_label`s, never as raw cells: a key a run lacks is a value of its
    own (MISSING), and True, 1 and "True" stay three values, whatever pandas does with NaN keys
    or with True == 1.
  - **learnt attacks**: a defense is credited only against a backdoor its undefended model learnt
    (`LEARNT_MIN`); on the other runs the defenses' records are left out, the rows say so in the
    column MARK_COLUMN and a note under the table counts them (`leave_out`).
"""
from __future__ import annotations

import numbers
from pathlib import Path

import numpy as np
import pandas as pd

from bdexp.defenses.contexts import Kind
from bdexp.registry import Registry
from bdexp.report.collect import config_cell
from bdexp.results import CASE_KEYS

# name -> function(long_frame) -> DataFrame; a table may carry notes for its footer in
# `table.attrs["notes"]` (a list of lines, see add_note)
TABLES: Registry = Registry("table")
# name -> function(long_frame, out_dir) -> list of written PNG paths (optional per table)
PLOTS: Registry = Registry("plot")

RUN_INDEX = ["dataset", "model", "attack", "train", "seed"]

# A defense is credited only against a backdoor its undefended model learnt:
# for runs whose undefended measure is below its minimum here, the records of the defenses are
# left out of what a table counts or averages, and the table says how many.
SUCCESS_TMR = 0.01  # ISPL Table 1: a defense succeeds when the TMR is below 1 %
LEARNT_MIN = {
    # TMR (ISPL eq. 7) of the undefended model (ISPL's ND): the success threshold of ISPL Table 1
    # ("TMR below 1%"). An undefended model under it already counts as a success, so crediting a
    # defense there says nothing. Every ND entry of ISPL Table 2 passes it (the lowest: 1.4 %, pair
    # 1/3 at ε = 5 %), so no case the paper counts is left out.
    "tmr": SUCCESS_TMR,
    # ASR of the run's own model (ML-MMDR, OVL and the matrix). ML-MMDR §5 reports an average ASR of
    # 0.993 (RBT) and 0.992 (ML-MMDR); below one half most triggered inputs keep their class, so the
    # backdoor was not learnt (CPU-scale Fashion-MNIST DLBD with crop + flip: ASR 0.035).
    "asr": 0.5,
}
# The sanitizer protocol's baselines (ISPL Table 2's ND and Oracle) describe the undefended attack
# and the clean ideal; they are never credited, so they stay in the tables for every run.
REFERENCES = ("nd", "oracle")
MARK_COLUMN = "undefended attack"
# Kinds a defense registers with (bdexp/defenses/contexts.py) that the tables read.
POOL_DETECTOR, INPUT_DETECTOR, SANITIZER = Kind.pool_detector, Kind.input_detector, Kind.sanitizer
# The repair defenses (bdexp/defenses/repair.py): post-training mitigations and training-time defenses.
REPAIR_KINDS = (Kind.mitigation, Kind.training_time)
# The record score_repair writes with every repaired model's scores (the undefended C-Acc): it puts a
# defense the registry does not know among the repair defenses.
REPAIR_MARK = "ba_undefended"
# The repair defenses' column order (BackdoorBench's leaderboard: fine-tuning and pruning first, the
# training-time ABL last); any other repair defense in the records follows by name.
REPAIR_ORDER = ["ft", "fp", "nad", "anp", "ibau", "rnp", "sau", "ftsam", "abl"]


def defense_kind(name) -> str | None:
    """The kind defense `name` registered with (`DEFENSES.meta(name)["kind"]`); None for a name
    the registry does not know (records of another bdexp) or one that declares no kind."""
    try:
        from bdexp.defenses import DEFENSES

        return DEFENSES.meta(str(name)).get("kind")
    except Exception:  # noqa: BLE001 - unknown name, or a defense package that does not import
        return None


def of_kind(rows: pd.DataFrame, kind: str) -> pd.DataFrame:
    """The records of defenses registered as `kind`, and of those the registry gives no kind
    (their records' shape put them here: see each table)."""
    if rows.empty or "defense" not in rows:
        return rows.iloc[0:0]
    kinds = {d: defense_kind(d) for d in rows["defense"].dropna().unique()}
    return rows[rows["defense"].map(lambda d: kinds.get(d) in (kind, None) if isinstance(d, str) else False)]


def repair_names(df: pd.DataFrame) -> list[str]:
    """The repair defenses with records in `df`, in REPAIR_ORDER then by name: those registered as a
    REPAIR_KINDS kind, and those the registry gives no kind whose records hold REPAIR_MARK."""
    if df.empty or "defense" not in df or "metric" not in df:
        return []
    marked = set(df.loc[df["metric"] == REPAIR_MARK, "defense"].dropna())
    names = [d for d in df["defense"].dropna().unique() if isinstance(d, str)]
    found = [d for d in names if defense_kind(d) in REPAIR_KINDS or (defense_kind(d) is None and d in marked)]
    rank = {name: i for i, name in enumerate(REPAIR_ORDER)}
    return sorted(found, key=lambda d: (rank.get(d, len(rank)), d))


def conflicting(df: pd.DataFrame, defenses=None) -> pd.DataFrame:
    """(run_dir, defense) of the record sets holding `threat_model_conflict` > 0 (the defense's
    threat model does not compose with the run's training regime: bdexp/defenses/sanitize.py),
    of `defenses` only where given."""
    rows = select(df, metric="threat_model_conflict", defense=list(defenses) if defenses is not None else None)
    if rows.empty or "run_dir" not in rows:
        return pd.DataFrame(columns=["run_dir", "defense"])
    return rows.loc[rows["value"] > 0, ["run_dir", "defense"]].drop_duplicates()


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


# The label of a row or column key a record does not have (a run without that option, a tag a
# record lacks).
MISSING = "-"


def _reads_as_another_kind(text: str) -> bool:
    """Whether a string, printed as it is, could be read as MISSING, a boolean or a number, or as
    a quoted string."""
    if text in (MISSING, "True", "False") or text[:1] in ("'", '"'):
        return True
    try:
        float(text)
    except ValueError:
        return False
    return True


def case_label(value) -> object:
    """A key's value as the label a table groups, pivots and prints: one label per case value.
    MISSING where the key is missing (NaN, None, NA); numbers as numbers (1 and 1.0 are one value,
    as results._same compares options); booleans as the text "True"/"False" (pandas would merge
    True with 1); lists and mappings as JSON text (as collect stores config lists); other strings
    as they are, quoted where they would read as one of the above ('-', 'True', '1')."""
    if isinstance(value, (bool, np.bool_)):
        return str(bool(value))
    if isinstance(value, (list, tuple, dict)):
        return config_cell(value)
    if value is None or (not isinstance(value, str) and pd.isna(value)):
        return MISSING
    if isinstance(value, numbers.Number):
        return value
    if isinstance(value, str):
        return repr(value) if _reads_as_another_kind(value) else value
    return str(value)


def case_labels(column: pd.Series) -> pd.Series:
    """case_label of every cell of `column` (an object Series on the same index)."""
    memo: dict = {}
    out = []
    for value in column.tolist():
        try:  # the type too: True, 1 and 1.0 are equal dict keys
            key = (type(value), value)
            out.append(memo[key] if key in memo else memo.setdefault(key, case_label(value)))
        except TypeError:  # unhashable (a list in a frame built by hand)
            out.append(case_label(value))
    return pd.Series(out, index=column.index, dtype=object)


def candidate_keys(rows: pd.DataFrame) -> list[str]:
    """The columns that may tell cases apart: each record's case keys (column CASE_KEYS, see
    collect.py: its run's identity, then the swept config keys), in record order, then any other
    dotted config column (a frame built by hand)."""
    found = rows[CASE_KEYS].tolist() if CASE_KEYS in rows else []
    keys = [k for keys in found if isinstance(keys, (tuple, list)) for k in keys]
    keys += [c for c in rows.columns if "." in str(c)]
    return [c for c in dict.fromkeys(keys) if c in rows and c not in ("seed", "bdexp_version")]


def case_keys(rows: pd.DataFrame, cell: list[str]) -> list[str]:
    """The case keys (candidate_keys) that differ between runs falling into one cell `cell` (the
    table's row and column keys): the levels a table must add to its rows so that no cell merges
    two cases. A key the cell already determines (attack.patch_size under `attack`,
    attack.poison_rate under ISPL's `eps`) is not added. Values are compared as case_labels, so a
    run that lacks a key differs from one that has it."""
    groups = [case_labels(rows[c]) for c in cell if c in rows]
    keys: list[str] = []
    for col in candidate_keys(rows):
        if col in cell:
            continue
        labels = case_labels(rows[col])
        if labels.nunique() < 2:
            continue
        if not groups or (labels.groupby(groups, dropna=False).nunique() > 1).any():
            keys.append(col)
            groups.append(labels)
    return keys


def learnt_runs(df: pd.DataFrame, basis: str = "asr") -> pd.DataFrame:
    """Per run_dir: which measure of the undefended model was read, its value and whether the
    attack was learnt (value >= LEARNT_MIN). basis "tmr" (ISPL's tables): ND's A (TMR) where
    defense nd ran, else the run's own TMR (the model ND keeps), else its ASR; basis "asr"
    (ML-MMDR, OVL, the matrix): the run's ASR. Runs with no such record are not listed (and are
    credited: there is nothing to say they failed)."""
    out: dict[str, tuple[str, float, bool]] = {}
    if df.empty or "run_dir" not in df:
        return pd.DataFrame(columns=["measure", "value", "learnt"])
    plain = select(df, metric=["tmr", "asr"], plain=True)
    sources = [("ASR", plain[plain["metric"] == "asr"], "asr")]
    if basis == "tmr":
        sources = [("ND TMR", select(df, metric="a", defense="nd"), "tmr"),
                   ("TMR", plain[plain["metric"] == "tmr"], "tmr"), *sources]
    for label, part, kind in sources:
        for run, value in part.dropna(subset=["value"]).groupby("run_dir")["value"].first().items():
            out.setdefault(run, (label, float(value), float(value) >= LEARNT_MIN[kind]))
    return pd.DataFrame.from_dict(out, orient="index", columns=["measure", "value", "learnt"])


def rule_text(basis: str) -> str:
    if basis == "tmr":
        return (f"ND's TMR < {LEARNT_MIN['tmr']:g}; where ND was not run the run's own TMR, "
                f"else its ASR < {LEARNT_MIN['asr']:g}")
    return f"the run's ASR < {LEARNT_MIN['asr']:g}"


def leave_out(rows: pd.DataFrame, learnt: pd.DataFrame | None, group: list[str]) -> tuple[pd.DataFrame, pd.Series]:
    """`rows` without the credited records (a defense other than REFERENCES) of runs whose attack
    was not learnt, and per `group` key (the table's row) that lost any, the marker for its row:
    "not learnt (ND TMR 0.000)" when no run of the row learnt it, "1 of 3 runs not learnt" when some
    did. `group` columns must hold no NaN (see prepare)."""
    none = pd.Series(dtype=object)
    if learnt is None or learnt.empty or rows.empty or "run_dir" not in rows or "defense" not in rows:
        return rows, none
    ok = rows["run_dir"].map(learnt["learnt"]).fillna(True).astype(bool)
    credited = rows["defense"].notna() & ~rows["defense"].isin(REFERENCES)
    drop = credited & ~ok
    if not drop.any():
        return rows, none
    total = rows[credited].groupby(group)["run_dir"].nunique()
    marks = {}
    for key, runs in rows[drop].groupby(group)["run_dir"]:
        runs = runs.unique()
        worst = learnt.loc[runs]
        marks[key] = (f"not learnt ({worst['measure'].iloc[0]} {worst['value'].max():.3f})"
                      if len(runs) == total[key] else f"{len(runs)} of {total[key]} runs not learnt")
    return rows[~drop], pd.Series(marks, dtype=object)


def add_note(table: pd.DataFrame, line: str) -> pd.DataFrame:
    """A line for the table's footer (rendered under it by bdexp-report)."""
    table.attrs.setdefault("notes", []).append(line)
    return table


def note_left_out(table: pd.DataFrame, marks: pd.Series, basis: str, unit: str = "row",
                  where: str = f"column '{MARK_COLUMN}'") -> pd.DataFrame:
    """The footer line for `leave_out`'s markers: how many rows lost every run, how many some."""
    if marks.empty:
        return table
    full = int(marks.str.startswith("not learnt").sum())
    return add_note(table, f"Undefended attack not learnt ({rule_text(basis)}): {full} left out ({unit}s with no run "
                           f"that learnt it), {len(marks) - full} with some runs left out; no defense is credited "
                           f"with those runs ({where}).")


def mark_rows(table: pd.DataFrame, marks: pd.Series, basis: str) -> pd.DataFrame:
    """Rows for marked keys the table lost entirely (blank cells), the MARK_COLUMN and the note."""
    if marks.empty:
        return table
    missing = marks.index.difference(table.index)
    if len(missing):
        if isinstance(table.index, pd.MultiIndex):
            missing = pd.MultiIndex.from_tuples(list(missing), names=table.index.names)
        else:
            missing = pd.Index(list(missing), name=table.index.name)
        table = pd.concat([table, pd.DataFrame(index=missing, columns=table.columns, dtype=float)]).sort_index()
    label = (MARK_COLUMN, *[""] * (table.columns.nlevels - 1)) if table.columns.nlevels > 1 else MARK_COLUMN
    table[label] = [marks.get(k, "") for k in table.index]
    return note_left_out(table, marks, basis)


def prepare(df: pd.DataFrame, index: list[str], columns: list[str]) -> tuple[pd.DataFrame, list[str]]:
    """A copy of `df` ready to pivot: integer tags as integers, the case keys appended to `index`
    (see case_keys), and every row/column key as its case_label (MISSING where a record lacks it)."""
    df = df.copy()
    for col in ("N", "prune_ratio"):  # integer-valued tags come back as floats next to NaN
        floats = col in df and pd.api.types.is_float_dtype(df[col])  # (an object column may hold True: not 1)
        if floats and df[col].notna().any() and (df[col].dropna() % 1 == 0).all():
            df[col] = df[col].astype("Int64")
    index = list(index) + case_keys(df, list(index) + list(columns))
    for col in dict.fromkeys(index + list(columns)):
        df[col] = case_labels(df[col]) if col in df else MISSING
    return df, index


def pivot_mean(df: pd.DataFrame, index: list[str], columns: list[str], values: str = "value", *,
               learnt: pd.DataFrame | None = None, basis: str = "asr", aggfunc: str = "mean",
               drop_constant: bool = True) -> pd.DataFrame:
    """Mean (or `aggfunc`) over repeated runs (seeds) of `values`, rows `index` plus the case keys,
    columns `columns`. With `learnt` (learnt_runs(df, basis)) the defense records of runs that did
    not learn the attack are left out and their rows marked (leave_out). Index levels constant
    across the frame are dropped (`drop_constant`) so tables stay narrow."""
    if df.empty:
        return pd.DataFrame()
    df, index = prepare(df, index, columns)
    df, marks = leave_out(df, learnt, index)
    if not df.empty:
        table = df.pivot_table(index=index, columns=columns, values=values, aggfunc=aggfunc)
    else:  # every run left out: the marked rows alone say so
        table = pd.DataFrame(index=pd.MultiIndex.from_tuples([], names=index) if len(index) > 1
                             else pd.Index([], name=index[0]))
    table = mark_rows(table, marks, basis)
    if drop_constant and isinstance(table.index, pd.MultiIndex) and table.index.nlevels > 1:
        keep = [name for name in table.index.names if table.index.get_level_values(name).nunique() > 1]
        drop = [n for n in table.index.names if n not in keep]
        if keep and drop:
            table = table.droplevel(drop)
    return table


@TABLES.register("runs")
def runs_table(df: pd.DataFrame) -> pd.DataFrame:
    """BA / ASR / TMR / RA per run (model-level metrics: records without defense/analysis tags), with
    the swept keys that tell the runs apart."""
    plain = select(df, metric=["ba", "asr", "tmr", "ra"], plain=True)
    if plain.empty:
        return pd.DataFrame()
    # the case keys are those that differ between runs of one method, whatever their seeds
    methods = [k for k in RUN_INDEX if k != "seed"]
    plain, index = prepare(plain, methods, ["metric"])
    plain["seed"] = case_labels(plain["seed"]) if "seed" in plain else MISSING
    index = [*methods, "seed", *index[len(methods):]]
    table = plain.pivot_table(index=index + ["run_dir"], columns="metric", values="value", aggfunc="first")
    table = table.dropna(how="all")
    table.columns.name = None
    return table[[c for c in ("ba", "asr", "tmr", "ra") if c in table.columns]]


def save_figure(fig, out_dir: Path, name: str) -> Path:
    """Write a matplotlib figure as `out_dir/name.png` and close it; returns the path."""
    import matplotlib.pyplot as plt

    path = Path(out_dir) / f"{name}.png"
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def f1_rows(df: pd.DataFrame) -> pd.DataFrame:
    """F1 records of AC, SS and SR with a column `f1` saying which F1 a row is: "rule: <name>" for
    the detector's own decision (AC's cluster choice, SS's top-⌈1.5·ε̂·n⌉ removal), "max-F1" for the
    best threshold over the scores (SR's only F1, as ML-MMDR §6.1 scores it; `f1_max` of the others)."""
    rows = select(df, metric=["f1", "f1_max"], defense=["ac", "ss", "sr"], level=["s1", "s2", "s3"])
    if rows.empty:
        return rows
    rows = rows[~((rows["defense"] == "sr") & (rows["metric"] == "f1_max"))].copy()
    rule = rows["rule"] if "rule" in rows else pd.Series(None, index=rows.index, dtype=object)
    own = (rows["metric"] == "f1") & (rows["defense"] != "sr")
    rows["f1"] = "max-F1"
    rows.loc[own, "f1"] = "rule: " + rule[own].fillna("default").astype(str)
    return rows
