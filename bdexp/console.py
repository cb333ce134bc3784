"""The shared rich console. Piped output (logs, CI, sweeps) gets 160 columns instead of rich's
default 80, so result tables are not truncated."""
import sys

from rich.console import Console

console = Console(width=None if sys.stdout.isatty() else 160)
