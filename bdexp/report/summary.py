"""The rich table printed at the end of a run."""
from __future__ import annotations

from rich.table import Table

from bdexp.console import console

_IDENTITY = ("metric", "value")


def print_summary(run: dict, metrics: list[dict]) -> None:
    title = (f"{run['dataset']} · {run['model']} · {run['attack']} ({run.get('attack_mode') or '-'}) · "
             f"{run['train']} · seed {run['seed']} · {run['device']} · {run['wall_s']:.1f}s"
             f" · model {run['model_cache']}")
    console.print(f"[bold]{title}")
    table = Table()
    tag_names = sorted({k for row in metrics for k in row if k not in _IDENTITY})
    for col in (*tag_names, "metric", "value"):
        table.add_column(col, justify="right" if col == "value" else "left")
    for row in metrics:
        value = row["value"]
        shown = "n/a" if value is None else f"{value:.4f}"
        table.add_row(*(str(row.get(t, "")) for t in tag_names), row["metric"], shown)
    console.print(table)
