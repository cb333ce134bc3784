"""ML-MMDR's tables and figures: aro (Table 2), distances (App. Tables 2-3), mmdr_lambda (Fig. 3),
f1_levels (Figs. 5-7), nc (Figs. 8, 10)."""
from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import pandas as pd  # noqa: E402

from bdexp.analysis.distances import swd1_note  # noqa: E402
from bdexp.report.collect import REGIME_LABELS, option_column  # noqa: E402
from bdexp.report.tables import (PLOTS, TABLES, add_note, f1_rows, leave_out, learnt_runs, pivot_mean,  # noqa: E402
                                 prepare, save_figure, select)

LEVELS = ["s1", "s2", "s3"]
MMDR = ["mlmmdr", "slmmdr"]
# ML-MMDR §5's names: regular backdoor training (λ = 0, the regimes' own name "rbt"), ML- and SL-MMDR
REGIME_LABELS.update({"rbt": "RBT", "mlmmdr": "ML", "slmmdr": "SL"})


def _mmdr_columns(rows: pd.DataFrame) -> pd.DataFrame:
    """`rows` with ML-MMDR's λ (train.mmd_weight) and kernel (train.kernel) as columns `lambda` and
    `kernel`, the regime's declared default where a run left them unchanged."""
    if rows.empty or "train" not in rows:
        return rows
    return rows.assign(**{"lambda": option_column(rows, "train", "mmd_weight"),
                          "kernel": option_column(rows, "train", "kernel")})


@TABLES.register("aro")
def aro_table(df: pd.DataFrame) -> pd.DataFrame:
    """ML-MMDR Table 2: ARO per attack × model (× regime), columns dataset × level."""
    rows = _mmdr_columns(select(df, metric="aro", analysis="distances", level=LEVELS))
    return pivot_mean(rows, ["attack", "model", "regime", "kernel"], ["dataset", "level"])


@TABLES.register("distances")
def distances_table(df: pd.DataFrame) -> pd.DataFrame:
    """ML-MMDR App. Tables 2–3: MMD², ED², SWD1 per level for malicious, intra- and inter-class;
    a note gives the set size m that SWD1 sums over (analysis/distances.py)."""
    rows = select(df, metric=["mmd2", "ed2", "swd1"], analysis="distances", level=LEVELS)
    table = pivot_mean(rows, ["dataset", "model", "regime", "attack", "pair"], ["metric", "level"])
    if not table.empty and (rows["metric"] == "swd1").any():
        runs = rows.loc[rows["metric"] == "swd1", "run_dir"].unique() if "run_dir" in rows else []
        sizes = select(df, metric="set_size", analysis="distances")
        sizes = sizes[sizes["run_dir"].isin(runs)]["value"].dropna() if "run_dir" in sizes else []
        add_note(table, swd1_note(sizes))
    return table


@TABLES.register("mmdr_lambda")
def lambda_table(df: pd.DataFrame) -> pd.DataFrame:
    """ML-MMDR Fig. 3 as a table: BA, ASR and ARO per level against λ, for SL- and ML-MMDR."""
    if "train" not in df:  # records of runs that name no regime
        return pd.DataFrame()
    runs = _mmdr_columns(df[df["train"].isin(MMDR)])
    plain = select(runs, metric=["ba", "asr"], plain=True).assign(level="-")
    aro = select(runs, metric="aro", analysis="distances", level=LEVELS + ["mean"])
    both = pd.concat([plain, aro]).assign(indicator=lambda d: d["metric"] + d["level"].map(lambda v: "" if v == "-" else f" {v}"))
    # λ = 0 is RBT for both regimes: show it in both columns
    return pivot_mean(both, ["dataset", "model", "attack", "lambda"], ["train", "indicator"])


@TABLES.register("f1_levels")
def f1_table(df: pd.DataFrame) -> pd.DataFrame:
    """ML-MMDR Figs. 5–7: F1 per defense × regime × attack, columns (N, r′) × level; runs whose
    ASR shows the backdoor was not learnt are left out and their rows marked (tables.LEARNT_MIN)."""
    rows = f1_rows(df)
    return pivot_mean(rows, ["dataset", "model", "defense", "f1", "regime", "attack"], ["N", "r", "level"],
                      learnt=learnt_runs(df, "asr"))


@TABLES.register("nc")
def nc_table(df: pd.DataFrame) -> pd.DataFrame:
    """ML-MMDR Fig. 8: Neural Cleanse ℓ1 of the infected vs uninfected classes, the target's
    anomaly index and whether NC flagged it; pruning curves are the figure."""
    rows = select(df, defense="nc", metric=["infected_l1", "uninfected_l1", "target_anomaly_index", "target_flagged"])
    return pivot_mean(rows, ["dataset", "attack", "model", "regime"], ["metric"], learnt=learnt_runs(df, "asr"))


@PLOTS.register("mmdr_lambda")
def lambda_plot(df: pd.DataFrame, out_dir: Path) -> list[Path]:
    """One panel per indicator (BA, ASR, ARO s1..s3), λ on x, a line per regime (Fig. 3)."""
    table = lambda_table(df)
    if table.empty:
        return []
    long = table.stack(list(range(table.columns.nlevels)), future_stack=True).rename("value").reset_index()
    if "lambda" not in long:  # one λ in the sweep: pivot_mean dropped the constant level
        long["lambda"] = _mmdr_columns(df[df["train"].isin(MMDR)])["lambda"].dropna().iloc[0]
    indicators = [i for i in ["ba", "asr", "aro s1", "aro s2", "aro s3"] if i in set(long["indicator"])]
    fig, axes = plt.subplots(1, len(indicators), figsize=(3.2 * len(indicators), 3), squeeze=False)
    for ax, ind in zip(axes[0], indicators):
        for train, part in long[long["indicator"] == ind].groupby("train"):
            curve = part.groupby("lambda")["value"].mean()
            ax.plot(curve.index, curve.values, marker="o", label={"mlmmdr": "ML-MMDR", "slmmdr": "SL-MMDR"}.get(train, train))
        ax.set_title(ind.upper() if " " not in ind else ind.replace("aro", "ARO"))
        if ind.startswith("aro"):
            ax.set_ylim(0.9, 3.1)  # ARO lives in [1, 3]
        ax.set_xlabel("λ")
    axes[0][0].legend()
    return [save_figure(fig, out_dir, "mmdr_lambda")]


@PLOTS.register("f1_levels")
def f1_plot(df: pd.DataFrame, out_dir: Path) -> list[Path]:
    """Bars of F1 per level, grouped by regime, one panel per (defense, which F1, attack)
    (Figs. 5–7); F1 averaged over the (N, r′) settings."""
    rows = f1_rows(df)
    if rows.empty:
        return []
    rows, panel = prepare(rows, ["defense", "f1", "attack"], ["level", "regime"])
    rows, _ = leave_out(rows, learnt_runs(df, "asr"), panel)  # as f1_table: learnt attacks only
    if rows.empty:
        return []
    panels = sorted(rows.groupby(panel).groups)
    fig, axes = plt.subplots(1, len(panels), figsize=(3.4 * len(panels), 3), squeeze=False)
    for ax, key in zip(axes[0], panels):
        part = rows[(rows[panel] == pd.Series(key, index=panel)).all(axis=1)]
        bars = part.pivot_table(index="level", columns="regime", values="value", aggfunc="mean")
        bars.plot.bar(ax=ax, rot=0, ylim=(0, 1.05))
        ax.legend(fontsize=7, loc="lower right")
        ax.set_title(" · ".join([key[0].upper(), *map(str, key[1:])]), fontsize=9)
        ax.set_ylabel("F1")
    return [save_figure(fig, out_dir, "f1_levels")]


@PLOTS.register("nc")
def pruning_plot(df: pd.DataFrame, out_dir: Path) -> list[Path]:
    """BA and ASR against the fraction of pruned s3 channels, a line per model × regime (Fig. 10)."""
    rows = select(df, defense="nc", metric=["ba", "asr"])
    if rows.empty or "prune_ratio" not in rows:
        return []
    rows, line = prepare(rows.dropna(subset=["prune_ratio"]), ["model", "regime", "attack"], ["metric", "prune_ratio"])
    fig, axes = plt.subplots(1, 2, figsize=(7, 3), squeeze=False)
    for ax, metric in zip(axes[0], ["ba", "asr"]):
        for key, part in rows[rows["metric"] == metric].groupby(line):
            curve = part.groupby("prune_ratio")["value"].mean()
            ax.plot(curve.index, curve.values, marker=".", label=" ".join(map(str, key)))
        ax.set_xlabel("pruned fraction of s3 channels")
        ax.set_title(metric.upper())
        ax.set_ylim(-0.02, 1.02)
    axes[0][1].legend(fontsize=7)
    return [save_figure(fig, out_dir, "nc_pruning")]
