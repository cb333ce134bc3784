"""The one way bdexp writes a file that another process (or a re-run) may read: results.json, the
partial records, report tables, cached models and datasets, training checkpoints.

`atomic_write(path, write_fn)` lets `write_fn` write a temporary file next to `path`
(`.<name>.<pid>.<random>.tmp`, same directory so the rename stays on one file system), flushes it
to disk and renames it over `path`. A reader sees the old file or the new one, never a torn one;
on any error (a full disk, a signal) the temporary is removed and the old file stays whole.
"""
from __future__ import annotations

import os
import uuid
from pathlib import Path
from typing import Callable


def _fsync(path: Path) -> None:
    with open(path, "rb") as handle:
        os.fsync(handle.fileno())


def atomic_write(path: str | os.PathLike, write_fn: Callable[[Path], object]) -> Path:
    """Write `path` through `write_fn(tmp)`, which writes the temporary path `tmp` (e.g.
    `lambda tmp: torch.save(obj, tmp)`); returns `path`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        write_fn(tmp)
        _fsync(tmp)
        os.replace(tmp, path)
    except BaseException:  # a full disk or a signal: the old file stays whole, no temporary is left
        tmp.unlink(missing_ok=True)
        raise
    return path


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    """`atomic_write` of a UTF-8 text file."""
    return atomic_write(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))
