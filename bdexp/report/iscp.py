"""ISCP's tables and figures: pw (Tables 1–3, Fig. 3), pw_canvas (Fig. 12) and
pw_trigger (Fig. 7 middle), all from the `patterns` analysis records."""
from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

from bdexp.report.tables import MISSING, PLOTS, TABLES, case_labels, prepare, save_figure, select  # noqa: E402

# One block of rows per trained model, plus every other key the sweep varies (tables.case_keys);
# levels constant over the frame are dropped.
BLOCK = ["dataset", "model", "regime", "attack"]


def _size_label(size: float) -> str:
    return f"{100 * float(size):g}%"


def _tidy(rows: pd.DataFrame, block: list[str]) -> pd.DataFrame:
    """`rows` with the block keys as the labels `prepare` gives them (tables.case_label)."""
    rows = rows.copy()
    for col in block:
        rows[col] = case_labels(rows[col]) if col in rows else MISSING
    return rows


def _block(table: pd.DataFrame) -> list[str]:
    """The block levels of a per_class table: everything but the extra tags and the class."""
    return [n for n in table.index.names if n not in ("canvas", "class")]


def _drop_constant(table: pd.DataFrame, levels: list[str]) -> pd.DataFrame:
    drop = [lv for lv in levels if table.index.get_level_values(lv).nunique() <= 1]
    return table.droplevel(drop) if drop and len(drop) < table.index.nlevels else table


def per_class(df: pd.DataFrame, metric: str = "pw", extra: tuple[str, ...] = ()) -> pd.DataFrame:
    """PW per block × extra tags × class (rows) and size (columns), averaged over seeds."""
    rows = select(df, metric=metric, analysis="patterns")
    if rows.empty:
        return pd.DataFrame()
    rows, index = prepare(rows, [*BLOCK, *extra, "class"], ["size"])
    block = [*BLOCK, *index[len(BLOCK) + len(extra) + 1:]]
    rows["class"] = rows["class"].astype(int)
    return rows.pivot_table(index=[*block, *extra, "class"], columns="size", values="value", aggfunc="mean")


@TABLES.register("pw")
def pw_table(df: pd.DataFrame) -> pd.DataFrame:
    """ISCP Tables 1–3: predictive power per class (rows, then mPW and STD over the classes) and
    pattern size (columns), plus the clean class accuracy ("Original Acc"); one block per model."""
    table = per_class(df)
    if table.empty:
        return table
    block = _block(table)
    acc = select(df, metric="class_acc", analysis="patterns")
    acc = (_tidy(acc, block).astype({"class": int}).groupby([*block, "class"])["value"].mean()
           if not acc.empty else pd.Series(dtype=float))
    blocks = []
    for key, part in table.groupby(level=block, sort=True):
        key = key if isinstance(key, tuple) else (key,)
        part = part.droplevel(block).sort_index()
        part["acc"] = [acc.get((*key, c), np.nan) for c in part.index]
        summary = pd.DataFrame([part.mean(), part.std(ddof=0)], index=["mPW", "STD"])  # ISCP Table 1: population STD
        part.index = part.index.astype(str)
        out = pd.concat([part, summary])
        out.index = pd.MultiIndex.from_tuples([(*key, c) for c in out.index], names=[*block, "class"])
        blocks.append(out)
    table = pd.concat(blocks)
    table.columns = [_size_label(c) if c != "acc" else "acc" for c in table.columns]
    return _drop_constant(table, block)


@TABLES.register("pw_canvas")
def pw_canvas_table(df: pd.DataFrame) -> pd.DataFrame:
    """ISCP Fig. 12 / App. D.1 as a table: mPW over the classes per canvas type and pattern size,
    each type's best of its N canvases (records `pw_by_canvas`, from runs with several types)."""
    table = per_class(df, "pw_by_canvas", extra=("canvas",))
    if table.empty:
        return table
    block = _block(table)
    table = table.groupby(level=[*block, "canvas"]).mean()
    table.columns = [_size_label(c) for c in table.columns]
    return _drop_constant(table, block)


@TABLES.register("pw_trigger")
def pw_trigger_table(df: pd.DataFrame) -> pd.DataFrame:
    """ISCP Fig. 7 middle: per model, the target class's PW at the trigger size (1 %; the recovered
    trigger on a backdoored model, the natural pattern on a clean one), the mean PW of all classes
    at that size, and the IoU of the recovered pattern with the real trigger (patch attacks)."""
    rows = select(df, analysis="patterns", metric=["pw", "trigger_pw", "trigger_iou"])
    if rows.empty:
        return pd.DataFrame()
    rows, block = prepare(rows, BLOCK, [])  # one output row per block: cases split blocks
    trig = rows[rows["metric"] == "trigger_iou"]
    size = float(trig["size"].iloc[0]) if len(trig) else 0.01
    rows = rows[np.isclose(rows["size"].astype(float), size)]
    per_run = []
    for key, part in rows.groupby([*block, "run_dir"], sort=True):
        pw = part[part["metric"] == "pw"]
        target = pw[pw["class"].astype(int) == int(part["target"].fillna(0).iloc[0])]["value"]
        given = part[part["metric"] == "trigger_pw"]["value"]
        iou = part[part["metric"] == "trigger_iou"]["value"]
        per_run.append({**dict(zip(block, key)),
                        "target_pw": given.mean() if len(given) else target.mean(),
                        "mpw": pw["value"].mean(), "trigger_iou": iou.mean()})
    out = pd.DataFrame(per_run).groupby(block).mean(numeric_only=True).dropna(how="all")
    out.columns = [f"{c} ({_size_label(size)})" for c in out.columns]
    return _drop_constant(out, block) if isinstance(out.index, pd.MultiIndex) else out


def _lines(ax, table: pd.DataFrame, group: list[str]) -> None:
    """One line of the mean over classes against pattern size (in %) per `group` key."""
    for key, part in table.groupby(level=group, sort=True):
        curve = part.mean()
        label = " · ".join(str(k) for k in (key if isinstance(key, tuple) else (key,)) if str(k) != "-")
        ax.plot(100 * curve.index.astype(float), curve.values, marker="o", label=label or "mPW")
    ax.set_xlabel("pattern size (% of the image)")
    ax.set_ylabel("mean predictive power")
    ax.set_ylim(bottom=0)
    ax.legend(fontsize=7)


@PLOTS.register("pw")
def pw_plot(df: pd.DataFrame, out_dir: Path) -> list[Path]:
    """ISCP Fig. 3: mPW against pattern size, one line per model / training regime."""
    table = per_class(df)
    if table.empty:
        return []
    fig, ax = plt.subplots(figsize=(4.2, 3.2))
    block = _block(table)
    varying = [lv for lv in block if table.index.get_level_values(lv).nunique() > 1] or block
    _lines(ax, table, varying)
    return [save_figure(fig, out_dir, "pw")]


@PLOTS.register("pw_canvas")
def pw_canvas_plot(df: pd.DataFrame, out_dir: Path) -> list[Path]:
    """ISCP Fig. 12: mPW against pattern size, one line per canvas type (and model if several)."""
    table = per_class(df, "pw_by_canvas", extra=("canvas",))
    if table.empty:
        return []
    fig, ax = plt.subplots(figsize=(4.2, 3.2))
    varying = [lv for lv in _block(table) if table.index.get_level_values(lv).nunique() > 1]
    _lines(ax, table, [*varying, "canvas"])
    return [save_figure(fig, out_dir, "pw_canvas")]
