"""The one way bdexp writes a file that another process (or a re-run) may read: results.json, the
partial records, report tables, cached models and datasets, training checkpoints.

`atomic_write(path, write_fn)` lets `write_fn` write a temporary file next to `path`
(`.<name>.<host>.<pid>.<random>.tmp`, same directory so the rename stays on one file system),
flushes it to disk and renames it over `path`. A reader sees the old file or the new one, never a
torn one; on any error (a full disk, a signal) the temporary is removed and the old file stays whole.

A writer killed outright (SIGKILL, a node that goes down) cannot remove its temporary, which may be
half a model. The first write into a directory in a process removes such leftovers: temporaries
of this host whose writer pid is no longer alive and on which no process holds the writer's lock
(each writer holds an exclusive `flock` on its temporary until it is renamed; the kernel drops it
when the writer dies, whatever pid namespace it ran in). Another host's temporaries (a cache on a
shared file system) are never touched, nor are those of a live pid (a reused pid keeps a leftover,
which is safe).
"""
from __future__ import annotations

import os
import re
import socket
import uuid
from pathlib import Path
from typing import Callable

try:  # BSD locks: held per open file, so the writer's own open/close of the temporary keeps it
    import fcntl
except ImportError:  # pragma: no cover - Windows: no leftover is ever taken for stale
    fcntl = None
# dots in the host name become "_" (not allowed in host names), so the name splits unambiguously
HOST = socket.gethostname().replace(".", "_") or "localhost"
_TEMPORARY = re.compile(r"^\.(?P<name>.+)\.(?P<host>[^.]+)\.(?P<pid>\d+)\.[0-9a-f]{8}\.tmp$")
_swept: set[Path] = set()  # directories whose leftovers this process has removed


def temporary_path(path: Path) -> Path:
    """The temporary `atomic_write` writes before renaming it to `path`."""
    return path.with_name(f".{path.name}.{HOST}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def _unlocked(tmp: Path) -> bool:
    """True when no process holds the writer's lock on `tmp` (so its writer is gone)."""
    if fcntl is None:
        return False
    try:
        fd = os.open(tmp, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_NOFOLLOW", 0))
    except OSError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return True
    except OSError:  # held: a writer is at work
        return False
    finally:
        os.close(fd)


def is_stale(tmp: Path) -> bool:
    """True for an atomic_write temporary that its writer left behind (see the module doc)."""
    match = _TEMPORARY.match(tmp.name)
    if match is None or match["host"] != HOST or _alive(int(match["pid"])):
        return False
    return _unlocked(tmp)


def remove_stale_temporaries(directory: Path) -> list[Path]:
    """Remove the stale atomic_write temporaries in `directory`; returns them."""
    removed = []
    for tmp in Path(directory).glob(".*.tmp"):
        if is_stale(tmp):
            try:
                tmp.unlink(missing_ok=True)
            except OSError:  # not ours to remove (another user's directory): leave it
                continue
            removed.append(tmp)
    return removed


def _fsync(path: Path) -> None:
    with open(path, "rb") as handle:
        os.fsync(handle.fileno())


def atomic_write(path: str | os.PathLike, write_fn: Callable[[Path], object]) -> Path:
    """Write `path` through `write_fn(tmp)`, which writes the temporary path `tmp` (e.g.
    `lambda tmp: torch.save(obj, tmp)`); returns `path`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.parent not in _swept:
        _swept.add(path.parent)
        remove_stale_temporaries(path.parent)
    tmp = temporary_path(path)
    lock = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)  # held until renamed (is_stale)
    try:
        if fcntl is not None:
            fcntl.flock(lock, fcntl.LOCK_EX)
        write_fn(tmp)
        _fsync(tmp)
        os.replace(tmp, path)
    except BaseException:  # a full disk or a signal: the old file stays whole, no temporary is left
        tmp.unlink(missing_ok=True)
        raise
    finally:
        os.close(lock)
    return path


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    """`atomic_write` of a UTF-8 text file."""
    return atomic_write(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))
