"""The shared rich consoles. `console` (stdout) carries results: tables and summaries; piped
output (CI, sweeps) gets 160 columns instead of rich's default 80, so result tables are not
truncated. `log_console` (stderr) carries log lines and progress bars, `err_console` (stderr)
errors, one unwrapped line each."""
import sys

from rich.console import Console
from rich.markup import escape

console = Console(width=None if sys.stdout.isatty() else 160)
err_console = Console(stderr=True, soft_wrap=True, highlight=False)
# Log lines and progress bars go to stderr, so stdout carries only results (tables, summaries)
# and `bdexp ... > results.txt` keeps them apart.
log_console = Console(stderr=True, width=None if sys.stderr.isatty() else 160)


def one_line(text) -> str:
    """`text` with its lines joined, so a message stays one line in a log or a terminal."""
    return " ".join(line.strip() for line in str(text).splitlines() if line.strip())


def print_error(message, prefix: str = "bdexp error") -> None:
    """`prefix: message` on stderr, on one line; the message is printed as is (no rich markup)."""
    err_console.print(f"[bold red]{prefix}:[/] {escape(one_line(message))}")
