"""Write a table as markdown, CSV and LaTeX."""
from __future__ import annotations

from pathlib import Path

import pandas as pd


def _fmt(v) -> str:
    if isinstance(v, float):
        return "" if pd.isna(v) else f"{v:.4f}"
    return "" if v is None else str(v)


def to_markdown(df: pd.DataFrame) -> str:
    """A GitHub-style markdown table of `df` with its index as leading columns."""
    flat = df.reset_index() if df.index.name or any(df.index.names) else df
    cols = [" / ".join(str(p) for p in c if str(p)) if isinstance(c, tuple) else str(c) for c in flat.columns]
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for _, row in flat.iterrows():
        lines.append("| " + " | ".join(_fmt(v) for v in row.tolist()) + " |")
    return "\n".join(lines) + "\n"


def write_table(df: pd.DataFrame, out_dir: Path, name: str, footer: str = "") -> dict[str, Path]:
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {"md": out_dir / f"{name}.md", "csv": out_dir / f"{name}.csv", "tex": out_dir / f"{name}.tex"}
    paths["md"].write_text(f"## {name}\n\n" + to_markdown(df) + (f"\n{footer}\n" if footer else ""))
    df.to_csv(paths["csv"])
    paths["tex"].write_text(df.to_latex(float_format="%.4f", na_rep="--"))
    return paths
