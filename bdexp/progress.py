"""One look for every long loop: a rich progress bar with a free-text info column."""
from __future__ import annotations

from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from bdexp.console import console

# `progress=false` in the run config turns every bar off (pipeline.run sets this): sweeps and
# logs piped to files then carry the log lines only.
ENABLED = True


def set_enabled(flag: bool) -> None:
    global ENABLED
    ENABLED = bool(flag)


def make_progress() -> Progress:
    return Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        TextColumn("{task.fields[info]}"),
        console=console,
        transient=False,
        disable=not ENABLED,
    )
