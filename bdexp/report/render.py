"""Write a table as markdown, CSV and LaTeX."""
from __future__ import annotations

from pathlib import Path

import pandas as pd

from bdexp.atomic import atomic_write_text


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


def with_spread(df: pd.DataFrame, std: pd.DataFrame) -> pd.DataFrame:
    """Cells as "mean ± std" strings where a std exists (markdown only; CSV keeps numbers)."""
    out = df.astype(object).copy()
    for col in df.columns:
        for idx in df.index:
            m, s = df.at[idx, col], std.at[idx, col]
            if isinstance(m, float) and not pd.isna(m):
                out.at[idx, col] = f"{m:.4f} ± {s:.4f}" if not pd.isna(s) else f"{m:.4f}"
    return out


def write_table(df: pd.DataFrame, out_dir: Path, name: str, footer: str = "",
                std: pd.DataFrame | None = None) -> dict[str, Path]:
    """NAME.md (mean ± std cells when `std` is given), NAME.csv, NAME.tex and NAME_std.csv;
    each file is written atomically."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {"md": out_dir / f"{name}.md", "csv": out_dir / f"{name}.csv", "tex": out_dir / f"{name}.tex"}
    shown = with_spread(df, std) if std is not None else df
    atomic_write_text(paths["md"], f"## {name}\n\n" + to_markdown(shown) + (f"\n{footer}\n" if footer else ""))
    atomic_write_text(paths["csv"], df.to_csv())
    atomic_write_text(paths["tex"], df.to_latex(float_format="%.4f", na_rep="--")
                      + "".join(f"% {line}\n" for line in footer.splitlines() if line))
    if std is not None:
        paths["std_csv"] = out_dir / f"{name}_std.csv"
        atomic_write_text(paths["std_csv"], std.to_csv())
    return paths


def write_report_index(out_dir: Path, tables: dict[str, dict[str, Path]], titles: dict[str, str],
                       footer: str) -> Path:
    """A one-page report.md: every table inline (its markdown) with links to its files and figures."""
    out_dir = Path(out_dir)
    lines = ["# bdexp report", "", footer, "", "Tables: " + ", ".join(f"[{n}](#{n})" for n in tables), ""]
    for name, files in tables.items():
        lines += [f"## {name}", "", titles.get(name, ""), ""]
        body = files["md"].read_text().split("\n", 2)[2] if "md" in files else ""
        lines += [body.replace(footer, "").rstrip(), ""]
        links = [f"[{kind}]({Path(p).name})" for kind, p in files.items() if not kind.startswith("png")]
        lines += ["Files: " + " · ".join(links), ""]
        lines += [f"![{name}]({Path(p).name})" for kind, p in files.items() if kind.startswith("png")]
        lines.append("")
    path = out_dir / "report.md"
    atomic_write_text(path, "\n".join(lines) + "\n")
    return path
