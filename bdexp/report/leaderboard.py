"""The repair leaderboard (`--table leaderboard`, + ASR–C-Acc plot): BackdoorBench's leaderboard
layout (Wu et al. 2022) for bdexp's repair defenses (bdexp/defenses/repair.py).

Rows: attacks, split on every other key the runs differ in besides the seed (tables.case_keys:
the dataset, model or training regime where a sweep varies them, the poison rate, a defense's
option, ...). Column groups: "No defense" (the run's own, undefended model: its records without a
`defense` tag), then every repair defense with records (tables.repair_names: kinds "mitigation"
and "training_time", in tables.REPAIR_ORDER). Each group holds

  - C-Acc: clean test accuracy (record `ba`),
  - ASR: attack success rate on the non-target triggered test images (`asr`),
  - RA: robust accuracy, the share of triggered images classified as their true class (`ra`),
  - DER: defense effectiveness rating against the run's own model (`der`,
    metrics.defense_effectiveness_rating; 0.5 = nothing changed); blank for "No defense",

each the mean over seeds (the markdown reads "mean ± std", NAME_std.csv the spread, as in every
table), and column `seeds` counts the seeds of the row. A defense is credited only where the
undefended attack was learnt (tables.LEARNT_MIN, basis "asr"): its cells leave out the other runs,
column "undefended attack" marks the row and a note counts them; "No defense" keeps every run. A
training-time defense whose threat model does not compose with the run's regime (record
`threat_model_conflict`) reads matrix.CONFLICT, with a note.
"""
from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

from bdexp.report.matrix import CONFLICT, repair_conflict_note  # noqa: E402
from bdexp.report.tables import (MARK_COLUMN, PLOTS, REPAIR_MARK, TABLES, conflicting, learnt_runs,  # noqa: E402
                                 pivot_mean, prepare, repair_names, save_figure, select)

NO_DEFENSE = "No defense"
# record -> column, in BackdoorBench's order
MEASURES = {"ba": "C-Acc", "asr": "ASR", "ra": "RA", "der": "DER"}
SEEDS = "seeds"
ROWS = ["attack", "regime"]  # as the matrix: one sweep over regimes reads as ML-MMDR's question
COLUMNS = ["group", "measure"]


def leaderboard_rows(df: pd.DataFrame) -> tuple[pd.DataFrame, list[str]]:
    """The records the leaderboard shows, with their column group (`group`) and `measure`, and the
    groups in order; a conflicting record set's values are +inf (no rate is infinite, so a cell
    holding one reads CONFLICT whatever else it averages)."""
    plain = select(df, metric=[m for m in MEASURES if m != "der"], plain=True)
    names = repair_names(df)
    fixed = select(df, metric=list(MEASURES), defense=names)
    if fixed.empty:
        return pd.DataFrame(), []
    parts = [plain.assign(group=NO_DEFENSE), fixed.assign(group=fixed["defense"])]
    rows = pd.concat([p for p in parts if not p.empty], ignore_index=True)
    rows["measure"] = rows["metric"].map(MEASURES)
    hit = conflicting(df, names)
    if not hit.empty:
        pairs = set(zip(hit["run_dir"], hit["defense"]))
        rows.loc[[pair in pairs for pair in zip(rows["run_dir"], rows["defense"])], "value"] = float("inf")
    groups = [NO_DEFENSE] * (not plain.empty) + [n for n in names if n in set(fixed["defense"])]
    return rows, groups


def other_images_note(df: pd.DataFrame, names: list[str]) -> str | None:
    """The footer line for repair defenses scored on other test images than the run's own model
    (a mitigation with clean_source=reserve: the images outside the defender's reserve), found where
    their `ba_undefended` (the undefended model on their images) differs from the run's `ba`."""
    own = select(df, metric="ba", plain=True)
    mine = select(df, metric=REPAIR_MARK, defense=names)
    if own.empty or mine.empty or "run_dir" not in own:
        return None
    gap = (mine["value"] - mine["run_dir"].map(own.groupby("run_dir")["value"].first())).abs()
    moved = mine[gap > 1e-9]
    if moved.empty:
        return None
    return (f"{', '.join(sorted(set(moved['defense'])))}: scored on the test images outside the defender's reserve "
            "(clean_source=reserve), not on all of them as \"No defense\" is; there the undefended model's C-Acc "
            f"differs from \"No defense\" by up to {gap.max():.4f} (records ba_undefended, asr_undefended), and "
            "DER compares with the undefended model on those same images.")


@TABLES.register("leaderboard")
def leaderboard_table(df: pd.DataFrame) -> pd.DataFrame:
    """BackdoorBench's leaderboard: attack rows (and every other case key) × (No defense, each
    repair defense) × (C-Acc, ASR, RA, DER), means over seeds, with a seeds count; a defense is
    credited only where the undefended attack was learnt."""
    rows, groups = leaderboard_rows(df)
    if rows.empty:
        return pd.DataFrame()
    table = pivot_mean(rows, ROWS, COLUMNS, learnt=learnt_runs(df, "asr"), drop_constant=False)
    notes = list(table.attrs.get("notes", []))
    mark = next((c for c in table.columns if (c[0] if isinstance(c, tuple) else c) == MARK_COLUMN), None)
    marks = table[mark] if mark is not None else None
    order = [(g, m) for g in groups for m in MEASURES.values()]
    table = pd.DataFrame({c: table[c] if c in table.columns else np.nan for c in order}, index=table.index)
    table.columns = pd.MultiIndex.from_tuples(order)
    # the seeds of each row (all its runs, whatever a defense's cell left out; a run that names no
    # seed counts as one of its own)
    prepared, index = prepare(rows, ROWS, COLUMNS)
    seed = prepared["seed"] if "seed" in prepared else pd.Series(np.nan, index=prepared.index)
    runs = prepared["run_dir"] if "run_dir" in prepared else pd.Series(prepared.index, index=prepared.index)
    seeds = seed.astype(object).where(seed.notna(), runs).groupby(
        [prepared[c] for c in index]).nunique()
    table[(SEEDS, "")] = pd.Series([int(seeds.get(key, 0)) for key in table.index], index=table.index, dtype=object)
    if marks is not None:
        table[(MARK_COLUMN, "")] = marks
    hit = table.isin([float("inf")])
    if hit.any().any():
        table = table.astype(object).mask(hit, CONFLICT)
        notes.append(repair_conflict_note({c[0] for c in table.columns[hit.any()]}))
    other = other_images_note(df, [g for g in groups if g != NO_DEFENSE])
    table.attrs["notes"] = notes + ([other] if other else [])
    return table


@PLOTS.register("leaderboard")
def leaderboard_plot(df: pd.DataFrame, out_dir: Path) -> list[Path]:
    """The ASR–C-Acc trade-off: one marker per (leaderboard row, defense), a marker and colour per
    defense, a grey line from each row's undefended model to its repaired ones; one panel per
    dataset · model where the leaderboard has several."""
    table = leaderboard_table(df)
    if table.empty:
        return []
    groups = [g for g in dict.fromkeys(table.columns.get_level_values(0)) if g not in (SEEDS, MARK_COLUMN)]
    values = table[[c for c in table.columns if c[0] in groups]].apply(pd.to_numeric, errors="coerce")
    values = values.replace([np.inf, -np.inf], np.nan)
    names = list(table.index.names)
    panel_levels = [n for n in ("dataset", "model") if n in names]
    keys = [tuple(k) if isinstance(k, tuple) else (k,) for k in table.index]
    panel_of = [tuple(k[names.index(n)] for n in panel_levels) for k in keys]
    panels = list(dict.fromkeys(panel_of))
    fig, axes = plt.subplots(1, len(panels), figsize=(5.2 * len(panels), 4.4), squeeze=False)
    styles = {g: (f"C{i % 10}", "o*sD^v<>pPhX"[i % 12]) for i, g in enumerate(groups)}
    for ax, panel in zip(axes[0], panels):
        for i, (key, shown) in enumerate(zip(keys, panel_of)):
            if shown != panel:
                continue
            row = values.iloc[i]
            base = (row.get((NO_DEFENSE, "ASR")), row.get((NO_DEFENSE, "C-Acc")))
            label = " · ".join(str(v) for n, v in zip(names, key) if n not in panel_levels)
            for g in groups:
                x, y = row.get((g, "ASR")), row.get((g, "C-Acc"))
                if x is None or y is None or pd.isna(x) or pd.isna(y):
                    continue
                if g != NO_DEFENSE and base[0] is not None and not pd.isna(base[0]) and not pd.isna(base[1]):
                    ax.plot([base[0], x], [base[1], y], color="0.8", lw=0.8, zorder=1)
                color, marker = styles[g]
                ax.scatter([x], [y], color=color, marker=marker, s=46, zorder=2)
                if g == NO_DEFENSE:
                    ax.annotate(label, (x, y), fontsize=7, xytext=(3, 3), textcoords="offset points")
        ax.set_xlim(-0.03, 1.03)
        ax.set_xlabel("ASR (lower is better)")
        ax.set_ylabel("C-Acc (higher is better)")
        ax.set_title(" · ".join([*map(str, panel), "ASR vs C-Acc (mean over seeds)"]), fontsize=9)
        ax.grid(alpha=0.3)
    handles = [plt.Line2D([], [], ls="", color=styles[g][0], marker=styles[g][1], label=g) for g in groups]
    axes[0][-1].legend(handles=handles, fontsize=7, loc="best")
    return [save_figure(fig, out_dir, "leaderboard")]
