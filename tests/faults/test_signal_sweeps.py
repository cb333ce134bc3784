"""Signals reach every process of a sweep and leave no debris: SIGTERM to a joblib sweep's parent is
passed on to its workers (each job records "interrupted", the parent exits 143, no worker is left),
Ctrl-C (twice) to the whole process group is one line saying what was kept, SIGHUP records the run
like SIGTERM, and a writer killed with SIGKILL leaves a temporary that a later write removes."""
from __future__ import annotations

import json
import os
import pty
import select
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from bdexp import atomic, jobs
from bdexp.results import read_status
from tests.conftest import as_foreground, with_tiny
from tests.faults.test_interrupt_faults import _cli

ROOT = Path(__file__).resolve().parents[2]
SWEEP_LINE = "bdexp: sweep interrupted: 2 job(s) interrupted, their results.json keep what finished"


class Command:
    """`bdexp ARGS` in a session of its own (so the test can signal its whole process group, as a
    terminal does), its stderr read line by line as it comes."""

    def __init__(self, args: list[str], cwd: Path):
        env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
        self.proc = subprocess.Popen([sys.executable, "-m", "bdexp", *args], cwd=cwd, env=env, text=True,
                                     stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True,
                                     preexec_fn=as_foreground)
        self.lines: list[str] = []
        self._reader = threading.Thread(target=lambda: self.lines.extend(self.proc.stderr), daemon=True)
        self._reader.start()

    @property
    def err(self) -> str:
        return "".join(self.lines)

    def wait_for(self, predicate, what: str, limit: float = 120.0) -> None:
        deadline = time.time() + limit
        while not predicate():
            if self.proc.poll() is not None or time.time() > deadline:
                self.group_signal(signal.SIGKILL)
                pytest.fail(f"never saw {what}; rc {self.proc.poll()}\n{self.err[-3000:]}")
            time.sleep(0.005)

    def group_signal(self, sig: int) -> None:
        os.killpg(self.proc.pid, sig)

    def finish(self, limit: float = 60.0) -> int:
        try:
            rc = self.proc.wait(timeout=limit)
        except subprocess.TimeoutExpired:
            self.group_signal(signal.SIGKILL)
            pytest.fail(f"bdexp did not end within {limit} s\n{self.err[-3000:]}")
        self._reader.join(timeout=limit)
        return rc

    def session(self) -> list[str]:
        """The processes still running in the command's session (its workers), zombies aside."""
        found = []
        for stat in Path("/proc").glob("[0-9]*/stat"):
            try:
                fields = stat.read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[3]) == self.proc.pid and fields[0] not in "ZX":
                found.append(stat.parent.name)
        return found

    def assert_nothing_left(self, limit: float = 10.0) -> None:
        """No process of the command outlives it (joblib's resource trackers end within moments)."""
        deadline = time.time() + limit
        while self.session() and time.time() < deadline:
            time.sleep(0.05)
        assert self.session() == [], self.err[-3000:]


def _checkpoints(cache: Path) -> int:
    return len(list((cache / "checkpoints").glob("*.pt"))) if (cache / "checkpoints").exists() else 0


def _joblib_sweep(tmp_path: Path, epochs: int) -> tuple[list[str], Path, Path]:
    sweep, cache = tmp_path / "sweep", tmp_path / "cache"
    args = ["-m", *with_tiny(f"train.epochs={epochs}", "dataset.train_size=128"), "attack=patched,blended",
            "hydra/launcher=joblib", "hydra.launcher.n_jobs=2", f"cache.dir={cache}", f"hydra.sweep.dir={sweep}"]
    return args, sweep, cache


def _statuses(sweep: Path) -> list[str]:
    return [read_status(sweep / job / "results.json")[0] for job in ("0", "1")]


def _dead_pid() -> int:
    child = subprocess.Popen(["true"])
    child.wait()
    return child.pid


def _leftover(directory: Path, name: str, pid: int, host: str = atomic.HOST) -> Path:
    """A temporary as atomic_write names it, with no writer's lock on it."""
    directory.mkdir(parents=True, exist_ok=True)
    tmp = directory / f".{name}.{host}.{pid}.0123abcd.tmp"
    tmp.write_bytes(b"half a file")
    return tmp


def _locked(tmp: Path) -> int:
    """Hold the writer's lock on `tmp` (as a live writer in another pid namespace would); the fd."""
    import fcntl

    fd = os.open(tmp, os.O_RDONLY)
    fcntl.flock(fd, fcntl.LOCK_EX)
    return fd


def test_sigterm_to_a_joblib_sweep_reaches_its_workers_and_the_rerun_completes(tmp_path):
    args, sweep, cache = _joblib_sweep(tmp_path, epochs=60)
    cmd = Command(args, tmp_path)
    cmd.wait_for(lambda: _checkpoints(cache) == 2, "both jobs training")
    cmd.proc.send_signal(signal.SIGTERM)  # to the parent only, as SLURM or `kill` does
    assert cmd.finish() == 143, cmd.err[-3000:]
    cmd.assert_nothing_left()
    assert _statuses(sweep) == ["interrupted", "interrupted"]
    assert [ln for ln in cmd.lines if ln.startswith("bdexp")] == [
        f"{SWEEP_LINE}; run the same command with hydra.sweep.dir={sweep} to resume\n"]
    assert "Traceback" not in cmd.err

    stale = _leftover(cache / "models", "x.pt", _dead_pid())
    again = _cli(args, tmp_path)
    assert again.returncode == 0, again.stderr[-3000:]
    assert again.stderr.count("resumed from") == 2
    assert _statuses(sweep) == ["complete", "complete"]
    assert not stale.exists() and not list(cache.rglob(".*.tmp"))


def test_ctrl_c_twice_to_a_joblib_sweep_says_what_was_kept(tmp_path):
    args, sweep, cache = _joblib_sweep(tmp_path, epochs=80)
    cmd = Command(args, tmp_path)
    cmd.wait_for(lambda: _checkpoints(cache) == 2, "both jobs training")
    cmd.group_signal(signal.SIGINT)  # a terminal's Ctrl-C reaches the parent and every worker
    time.sleep(0.2)
    cmd.group_signal(signal.SIGINT)
    assert cmd.finish() == 130, cmd.err[-3000:]
    cmd.assert_nothing_left()
    assert _statuses(sweep) == ["interrupted", "interrupted"]
    assert [ln for ln in cmd.lines if ln.startswith("bdexp")] == [
        f"{SWEEP_LINE}; run the same command with hydra.sweep.dir={sweep} to resume\n"]
    assert "Traceback" not in cmd.err and "Exception ignored" not in cmd.err
    assert not list(cache.rglob(".*.tmp"))


def test_ctrl_c_twice_to_a_run_is_one_line_and_exit_130(tmp_path):
    cache = tmp_path / "cache"
    cmd = Command([*with_tiny("train.epochs=100", "dataset.train_size=128"), f"cache.dir={cache}",
                   f"hydra.run.dir={tmp_path / 'run'}"], tmp_path)
    cmd.wait_for(lambda: _checkpoints(cache) == 1, "training")
    cmd.group_signal(signal.SIGINT)
    cmd.wait_for(lambda: "interrupted during" in cmd.err, "the interrupt's line")
    cmd.group_signal(signal.SIGINT)  # while it exits: no KeyboardInterrupt from an exit handler
    assert cmd.finish() == 130, cmd.err[-3000:]
    said = [ln for ln in cmd.lines if "interrupted" in ln]
    assert len(said) == 1 and said[0].startswith("interrupted during training at epoch"), cmd.err[-3000:]
    assert "Traceback" not in cmd.err and "Exception ignored" not in cmd.err
    assert read_status(tmp_path / "run" / "results.json")[0] == "interrupted"


def _catches_sigterm(pid: int) -> bool:
    status = Path(f"/proc/{pid}/status").read_text()
    caught = next(line for line in status.splitlines() if line.startswith("SigCgt:"))
    return bool(int(caught.split()[1], 16) >> (signal.SIGTERM - 1) & 1)


def test_sigterm_while_composing_says_nothing_was_computed(tmp_path):
    """Before pipeline.run starts (bdexp's handlers are in place, Hydra composes): exit 143, no record."""
    cmd = Command([*with_tiny(), f"cache.dir={tmp_path / 'cache'}", f"hydra.run.dir={tmp_path / 'run'}"], tmp_path)
    cmd.wait_for(lambda: _catches_sigterm(cmd.proc.pid), "bdexp's signal handlers")
    cmd.proc.send_signal(signal.SIGTERM)
    assert cmd.finish() == 143, cmd.err[-3000:]
    assert cmd.lines == ["bdexp: interrupted before the run started; nothing was computed\n"], cmd.err[-3000:]
    assert not (tmp_path / "run" / "results.json").exists()


def _in_a_terminal(args: list[str], until, limit: float = 120.0) -> int:
    """Run `bdexp ARGS` in a terminal of its own (a pty), close that terminal once `until()` is
    true (the kernel sends SIGHUP, as when a terminal window or ssh session closes) and return
    its exit status."""
    pid, terminal = pty.fork()
    if pid == 0:  # the child: bdexp, its terminal the pty
        os.execve(sys.executable, [sys.executable, "-m", "bdexp", *args],
                  {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"})
    deadline = time.time() + limit
    while not until() and time.time() < deadline:
        if select.select([terminal], [], [], 0.01)[0]:
            try:
                os.read(terminal, 65536)  # what bdexp prints, read so that it never blocks writing
            except OSError:  # it ended
                break
    os.close(terminal)
    while time.time() < deadline:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            return os.waitstatus_to_exitcode(status)
        time.sleep(0.01)
    os.kill(pid, signal.SIGKILL)
    pytest.fail("bdexp did not end after its terminal closed")


def test_closing_the_terminal_records_the_run_and_a_stale_temporary_is_removed(tmp_path):
    """SIGHUP is an interrupt like SIGTERM: a record and exit 129, though the terminal it would
    print its line on is gone. The run's first checkpoint write removes a dead writer's
    temporary, and only that one: not one whose lock is held, another host's or a live pid's."""
    cache = tmp_path / "cache"
    dead = _dead_pid()
    stale = _leftover(cache / "checkpoints", "a.pt", dead)
    kept = [_leftover(cache / "checkpoints", "b.pt", dead),  # locked: a live writer in another pid namespace
            _leftover(cache / "checkpoints", "c.pt", dead, host="otherhost"),
            _leftover(cache / "checkpoints", "d.pt", os.getpid())]
    held = _locked(kept[0])
    args = [*with_tiny("train.epochs=100", "dataset.train_size=128"), f"cache.dir={cache}",
            f"hydra.run.dir={tmp_path / 'run'}"]
    assert _in_a_terminal(args, until=lambda: _checkpoints(cache) == 1) == 129
    status, payload = read_status(tmp_path / "run" / "results.json")
    assert status == "interrupted" and payload["run"]["interrupted"]["signal"] == "SIGHUP"
    os.close(held)
    assert not stale.exists() and all(p.exists() for p in kept)


def test_a_writer_killed_mid_write_leaves_a_temporary_the_next_write_removes(tmp_path):
    target = tmp_path / "models" / "m.pt"
    writer = subprocess.Popen([sys.executable, "-c", (
        "import sys, time; from bdexp.atomic import atomic_write\n"
        "def slow(tmp):\n    tmp.write_bytes(b'x' * 4096); time.sleep(60)\n"
        f"atomic_write({str(target)!r}, slow)")], env={**os.environ, "PYTHONPATH": str(ROOT)})
    deadline = time.time() + 30
    while not list(target.parent.glob(".*.tmp")) and time.time() < deadline:
        time.sleep(0.005)
    [left] = target.parent.glob(".*.tmp")
    assert not atomic.is_stale(left)  # its writer is at work (alive, and holding its lock)
    writer.send_signal(signal.SIGKILL)
    writer.wait()
    assert left.exists() and left.name.startswith(f".m.pt.{atomic.HOST}.{writer.pid}.")
    assert atomic.is_stale(left)  # the kernel dropped its lock with it
    atomic.atomic_write_text(target.with_name("other.json"), json.dumps({"ok": 1}))
    assert not left.exists() and not target.exists()


def test_sighup_is_an_interrupt_unless_it_is_ignored():
    """A run catches SIGHUP as it does SIGTERM; under `nohup` (SIGHUP ignored) it stays ignored."""
    previous = signal.signal(signal.SIGHUP, signal.SIG_DFL)
    try:
        with jobs.interruptible():
            assert signal.getsignal(signal.SIGHUP) is jobs._on_signal
        signal.signal(signal.SIGHUP, signal.SIG_IGN)
        with jobs.interruptible():
            assert signal.getsignal(signal.SIGHUP) is signal.SIG_IGN
            assert signal.getsignal(signal.SIGTERM) is jobs._on_signal
        assert signal.getsignal(signal.SIGHUP) is signal.SIG_IGN
    finally:
        signal.signal(signal.SIGHUP, previous)
