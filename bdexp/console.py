"""The shared rich console (stderr stays free for logging)."""
from rich.console import Console

console = Console()
