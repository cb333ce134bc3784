"""One look for every long loop (a rich progress bar with a free-text info column) and one format
for every log line: bdexp's, Hydra's own and the <run dir>/<job name>.log file all read
``2026-12-01 12:27:16 INFO     message`` (conf/hydra/job_logging/bdexp.yaml and
conf/hydra/hydra_logging/bdexp.yaml build their handlers with `log_handler` / `log_formatter`)."""
from __future__ import annotations

import logging

from rich.logging import RichHandler
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from bdexp.console import log_console

# `progress=false` in the run config turns every bar off (pipeline.run sets this): sweeps and
# logs piped to files then carry the log lines only.
ENABLED = True

LOG_FORMAT = "%(asctime)s %(levelname)-8s %(message)s"
LOG_DATEFMT = "%Y-%m-%d %H:%M:%S"


def set_enabled(flag: bool) -> None:
    global ENABLED
    ENABLED = bool(flag)


class LineFormatter(logging.Formatter):
    """LOG_FORMAT with the message's leading whitespace dropped (Hydra indents its job lines
    with a tab), so every line starts its message in the same column."""

    def formatMessage(self, record: logging.LogRecord) -> str:
        record.message = record.message.lstrip()
        return super().formatMessage(record)


def log_formatter() -> logging.Formatter:
    return LineFormatter(LOG_FORMAT, LOG_DATEFMT)


class PlainConsoleHandler(logging.Handler):
    """One unwrapped line per record, in LOG_FORMAT, on the shared console's stream (pipes, CI, log
    files): rich would wrap a long message over several lines at the console width."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            stream = log_console.file
            stream.write(self.format(record) + "\n")
            stream.flush()
        except Exception:  # logging must never take the run down
            self.handleError(record)


def log_handler() -> logging.Handler:
    """The console handler: rich's columns (time, level, message; same time format as the file) on
    a terminal, where it keeps log lines above a live progress bar; plain lines elsewhere."""
    if log_console.is_terminal:
        handler: logging.Handler = RichHandler(console=log_console, show_path=False, log_time_format=LOG_DATEFMT,
                                               omit_repeated_times=False)
        handler.setFormatter(LineFormatter("%(message)s"))
    else:
        handler = PlainConsoleHandler()
        handler.setFormatter(log_formatter())
    return handler


def make_progress() -> Progress:
    # Off where the console is not a terminal: there a bar is printed once, at its end, and says
    # again what the log line after each loop says (e.g. "train: 3 epochs in 1.2s ...").
    return Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        TextColumn("{task.fields[info]}"),
        console=log_console,
        transient=False,
        disable=not ENABLED or not log_console.is_terminal,
    )
