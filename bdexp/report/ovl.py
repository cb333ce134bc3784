"""OVL's domain-shift figure (`shift`; OVL §IV, Fig. 5): measured accuracy and Theorem 2's
bounds against the purity ρ, from the records of analysis=[shift] (bdexp/analysis/shift.py)."""
from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import pandas as pd  # noqa: E402

from bdexp.report.tables import (MISSING, PLOTS, TABLES, case_labels, pivot_mean, prepare, save_figure,  # noqa: E402
                                 select)

SPACES = ["input", "hidden", "output"]
NORMS = ["l1", "l2", "linf"]
NORM_LABELS = {"l1": "ℓ1", "l2": "ℓ2", "linf": "ℓ∞"}
RUN_KEYS = ["dataset", "model", "attack", "train"]


def _order(value, known: list[str]) -> tuple[int, str]:
    return (known.index(value) if value in known else len(known), str(value))


@TABLES.register("shift")
def shift_table(df: pd.DataFrame) -> pd.DataFrame:
    """OVL Fig. 5 as a table: accuracy on T = ρ·clean + (1−ρ)·triggered (column actual) and Theorem
    2's bound a_Q + (a_P − a_Q)·bound(P, T) per space × norm, rows ρ; means over seeds."""
    acc = select(df, metric="shift_acc", analysis="shift").assign(space="actual", norm="acc")
    bound = select(df, metric="shift_bound", analysis="shift")
    if acc.empty and bound.empty:
        return pd.DataFrame()
    table = pivot_mean(pd.concat([acc, bound]), RUN_KEYS + ["rho"], ["space", "norm"])
    cols = sorted(table.columns, key=lambda c: (_order(c[0], ["actual"] + SPACES), _order(c[1], ["acc"] + NORMS)))
    return table[cols]


@PLOTS.register("shift")
def shift_plot(df: pd.DataFrame, out_dir: Path) -> list[Path]:
    """Accuracy against ρ with one bound curve per norm, a panel per space (columns) and per run
    setting that varies across the frame (rows), as OVL Fig. 5."""
    acc = select(df, metric="shift_acc", analysis="shift")
    bound = select(df, metric="shift_bound", analysis="shift")
    if acc.empty or bound.empty:
        return []
    bound, keys = prepare(bound, RUN_KEYS, ["rho", "space", "norm"])  # run keys plus the swept ones
    acc = acc.assign(**{k: case_labels(acc[k]) if k in acc else MISSING for k in keys})  # as prepare labels them
    keys = [k for k in keys if bound[k].nunique() > 1]
    settings = [g if isinstance(g, tuple) else (g,) for g in bound.groupby(keys).groups] if keys else [()]
    spaces = sorted(set(bound["space"]), key=lambda s: _order(s, SPACES))
    fig, axes = plt.subplots(len(settings), len(spaces), figsize=(3.4 * len(spaces), 3 * len(settings)), squeeze=False)
    for row, setting in enumerate(settings):
        def pick(frame: pd.DataFrame) -> pd.DataFrame:
            for k, v in zip(keys, setting):
                frame = frame[frame[k] == v]
            return frame

        actual = pick(acc).groupby("rho")["value"].mean()
        for ax, space in zip(axes[row], spaces):
            part = pick(bound)
            part = part[part["space"] == space]
            for norm in sorted(set(part["norm"]), key=lambda n: _order(n, NORMS)):
                curve = part[part["norm"] == norm].groupby("rho")["value"].mean()
                ax.plot(curve.index, curve.values, marker=".", label=f"bound {NORM_LABELS.get(norm, norm)}")
            ax.plot(actual.index, actual.values, "k-o", markersize=3, label="actual")
            ax.set_title(" · ".join([f"{space} space", *map(str, setting)]), fontsize=9)
            ax.set_xlabel("purity ρ")
            ax.set_ylim(-0.02, 1.02)
        axes[row][0].set_ylabel("accuracy")
    axes[0][0].legend(fontsize=7)
    return [save_figure(fig, out_dir, "shift")]
