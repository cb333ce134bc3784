"""Every bad input gets one clear line and exit 2: bad values of numeric keys, unknown
keys and options, unresolvable interpolations, a run or cache directory that cannot be written, a
full disk. Each CLI case asserts the exit status, the one `bdexp error:` line on stderr, no
traceback, and that what an earlier run left in the run and cache directories is unchanged. A bug
still gives one traceback (and exit 1), never two."""
from __future__ import annotations

import errno
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from bdexp import pipeline
from bdexp.errors import ConfigError
from bdexp.validation import RunOptions, check_run, probe_writable, validate_config
from tests.conftest import compose_cfg, with_tiny

ROOT = Path(__file__).resolve().parents[2]
CONF = ROOT / "bdexp" / "conf"

# Patches bdexp.pipeline.fit, then runs the CLI: a bug ("bug"), a full disk while training ("full").
WRAPPER = """
import errno, sys
import bdexp.pipeline
mode = sys.argv.pop(1)
def fit(*args, **kwargs):
    if mode == "bug":
        raise RuntimeError("planted bug")
    raise OSError(errno.ENOSPC, "No space left on device", sys.argv[-1].split("=", 1)[1] + "/models/x.pt")
bdexp.pipeline.fit = fit
from bdexp.cli import main
main()
"""


# A log line on stderr (bdexp/progress.py LOG_FORMAT): lines that are not the error itself
LOG_LINE = re.compile(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d (DEBUG|INFO|WARNING|ERROR) ")


def _cli(args, cwd, prefix=("-m", "bdexp")):
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    env.pop("HYDRA_FULL_ERROR", None)
    return subprocess.run([sys.executable, *prefix, *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=300)


def _snapshot(*dirs: Path) -> dict[str, bytes]:
    return {str(p): p.read_bytes() for d in dirs if d.exists() for p in sorted(d.rglob("*")) if p.is_file()}


@pytest.fixture
def earlier(tmp_path):
    """A run dir holding an earlier run's complete results.json, and a cache dir with a model."""
    run_dir, cache = tmp_path / "run", tmp_path / "cache"
    (run_dir).mkdir()
    (run_dir / "results.json").write_text(json.dumps(
        {"status": "complete", "run": {"config_hash": "0123456789abcdef", "attack": "patched"}, "metrics": []}))
    (cache / "models").mkdir(parents=True)
    (cache / "models" / "earlier.pt").write_bytes(b"an earlier model")
    return run_dir, cache


def _assert_unchanged(before: dict[str, bytes], after: dict[str, bytes]) -> None:
    """Every earlier file is there, byte for byte; new files are only Hydra's (.hydra/, the log)."""
    assert {k: v for k, v in after.items() if k in before} == before
    assert not [k for k in after if k not in before and Path(k).parent.name != ".hydra" and not k.endswith(".log")]


def _assert_one_line(res, *needles: str):
    assert res.returncode == 2, res.stderr[-2000:]
    assert "Traceback" not in res.stdout + res.stderr
    lines = [line for line in res.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("bdexp error: "), res.stderr
    for needle in needles:
        assert needle in lines[0], lines[0]
    assert "training" not in res.stdout.lower()  # stopped before any work


@pytest.mark.parametrize("override, needles", [
    ("train.epochs=abc", ["train.epochs='abc'", "an integer >= 1"]),
    ("train.epochs=0", ["train.epochs=0", "an integer >= 1"]),
    ("train.epochs=-1", ["train.epochs=-1", "an integer >= 1"]),
    ("train.batch_size=0", ["train.batch_size=0", "an integer >= 1"]),
    ("train.lr=abc", ["train.lr='abc'", "a finite number > 0"]),
    ("seed=abc", ["seed='abc'", "an integer >= 0"]),
    ("train.lr=inf", ["train.lr=inf", "a finite number > 0"]),  # would train to a NaN loss, or not at all
    ("seed=" + "1" * 4400, ["seed=<4400 digits>", "no bdexp key takes such a number"]),  # Python reads <= 4300
])
def test_bad_numeric_value_is_one_line_and_changes_nothing(override, needles, earlier, tmp_path):
    run_dir, cache = earlier
    before = _snapshot(run_dir, cache)
    res = _cli([*with_tiny(override), f"cache.dir={cache}", f"hydra.run.dir={run_dir}"], tmp_path)
    _assert_one_line(res, *needles)
    _assert_unchanged(before, _snapshot(run_dir, cache))


@pytest.mark.parametrize("override, needles", [
    ("trian.epochs=3", ["trian.epochs"]),                                   # a typo in a key
    ("dataset=nonexist", ["dataset/nonexist", "synthetic"]),                # an unknown option, with the list
    ("train.epochs=[1", ["train.epochs=[1"]),                               # override syntax
    ("seed=${nope}", ["does not resolve", "nope"]),                         # an interpolation
    ("+trian.epochs=5", ["unknown top-level key(s) trian"]),                # Hydra's own fix for a typo: refused
])
def test_hydra_composition_errors_are_one_line_exit_2(override, needles, tmp_path):
    res = _cli([*with_tiny(override), "cache.enabled=false", f"hydra.run.dir={tmp_path / 'r'}"], tmp_path)
    _assert_one_line(res, *needles)


def test_unwritable_run_dir_and_cache_dir_that_is_a_file(earlier, tmp_path):
    run_dir, cache = earlier
    blocker = tmp_path / "a_file"
    blocker.write_text("not a directory")
    res = _cli([*with_tiny(), f"cache.dir={cache}", f"hydra.run.dir={blocker / 'run'}"], tmp_path)
    _assert_one_line(res, str(blocker / "run"), "not a directory")
    res = _cli([*with_tiny(), f"cache.dir={cache}", f"hydra.run.dir={blocker}"], tmp_path)
    _assert_one_line(res, str(blocker), "a file of that name")
    before = _snapshot(run_dir)
    res = _cli([*with_tiny(), f"cache.dir={blocker}", f"hydra.run.dir={run_dir}"], tmp_path)
    _assert_one_line(res, "cache directory", str(blocker), "cache.dir")
    assert blocker.read_text() == "not a directory"
    _assert_unchanged(before, _snapshot(run_dir))


def test_full_disk_while_running_is_one_line_and_keeps_earlier_results(earlier, tmp_path):
    run_dir, cache = earlier
    before = _snapshot(run_dir, cache)
    script = tmp_path / "wrapper.py"
    script.write_text(WRAPPER)
    res = _cli(["full", *with_tiny(), f"hydra.run.dir={tmp_path / 'new_run'}", f"cache.dir={cache}"], tmp_path,
               prefix=(str(script),))
    assert res.returncode == 2 and "Traceback" not in res.stdout + res.stderr
    lines = [line for line in res.stderr.splitlines() if line.strip()]  # the run's log lines, then the error
    assert [line for line in lines if not LOG_LINE.match(line)] == lines[-1:] == [
        f"bdexp error: the disk is full writing {cache}/models/x.pt; free space, "
        "or point hydra.run.dir and cache.dir at another disk"]
    after = _snapshot(run_dir, cache)
    assert {k: v for k, v in after.items() if k in before} == before  # complete results kept
    assert not [k for k in after if k.endswith(".tmp")]


def test_another_config_into_a_run_dir_with_complete_results_is_refused(earlier, tmp_path):
    """A run pointed at the directory of a complete run of another config would replace its results:
    refused in one line, nothing changed (a sweep re-run keeps both instead: tests/test_jobs.py)."""
    run_dir, cache = earlier
    before = _snapshot(run_dir, cache)
    res = _cli([*with_tiny(), f"cache.dir={cache}", f"hydra.run.dir={run_dir}"], tmp_path)
    _assert_one_line(res, "already holds complete results of another config (hash 0123456789abcdef)",
                     "choose another hydra.run.dir")
    _assert_unchanged(before, _snapshot(run_dir, cache))


def test_a_bug_prints_one_traceback_and_its_record(tmp_path):
    script = tmp_path / "wrapper.py"
    script.write_text(WRAPPER)
    run_dir = tmp_path / "run"
    res = _cli(["bug", *with_tiny(), "cache.enabled=false", f"hydra.run.dir={run_dir}"], tmp_path,
               prefix=(str(script),))
    assert res.returncode == 1
    out = res.stdout + res.stderr
    assert out.count("Traceback") == 1 and out.count("RuntimeError: planted bug") == 1
    assert "Traceback" in res.stderr and "hydra/_internal" not in res.stderr  # from the task down
    record = json.loads((run_dir / "results.json").read_text())
    assert record["status"] == "failed" and record["run"]["error"]["type"] == "RuntimeError"
    assert str(run_dir / "results.json") in res.stderr.splitlines()[-1]


def test_help_describes_bdexp(tmp_path):
    res = _cli(["--help"], tmp_path)
    assert res.returncode == 0
    assert "powered by Hydra" not in res.stdout
    for needle in ("bdexp: backdoor experiments", "== Config groups", "dataset: ", "defense: ",
                   "== Common keys", "train.epochs=", "== Examples ==", "bdexp -m experiment="):
        assert needle in res.stdout, needle


# ---- in process: the table and the Python path ---------------------------------------------------

@pytest.mark.parametrize("override, key", [
    ("dataset.train_limit=0", "dataset.train_limit=0"),
    ("dataset.image_size=2", "dataset.image_size=2"),
    ("dataset.channels=2", "one of 1, 3"),
    ("screening.sizes=[0,5]", "screening.sizes=[0, 5]"),
    ("screening.ratios=[]", "screening.ratios=[]"),
    ("screening.reserve_per_class=x", "screening.reserve_per_class='x'"),
    ("eval_batch_size=0", "eval_batch_size=0"),
    ("threads=0", "threads=0"),
    ("checkpoint_every=-1", "checkpoint_every=-1"),
    ("train.epochs=2.5", "train.epochs=2.5"),
    ("train.lr=nan", "train.lr=nan"),
    ("train.milestones=[0.5,x]", "train.milestones=[0.5, 'x']"),
    ("progress=1", "true or false"),
    ("eval_batch_size=null", "eval_batch_size=null"),
])
def test_table_rejects_with_key_value_and_what_is_allowed(override, key):
    with pytest.raises(ConfigError, match="is not allowed: use ") as info:
        validate_config(compose_cfg(with_tiny(override)))
    assert key in str(info.value) and "\n" not in str(info.value)


def test_every_key_of_a_method_is_checked_against_its_declaration():
    """defense.nc.steps is declared an integer >= 1 by NCOptions (bdexp/defenses/nc.py)."""
    with pytest.raises(ConfigError, match=r"defense.nc.steps='abc' is not allowed: use an integer"):
        validate_config(compose_cfg(with_tiny("defense=[nc]", "defense.nc.steps=abc")))
    with pytest.raises(ConfigError, match=r"analysis.distances.repeats='x'"):
        validate_config(compose_cfg(with_tiny("analysis=[distances]", "analysis.distances.repeats=x")))
    with pytest.raises(ConfigError, match=r"defense.nc.figure=3 is not allowed: use true or false"):
        validate_config(compose_cfg(with_tiny("defense=[nc]", "defense.nc.figure=3")))


def test_every_shipped_preset_passes():
    """No false alarm: every group option and every experiment preset (both scales) validates."""
    defenses = ",".join(p.stem for p in (CONF / "defense").glob("*.yaml"))
    analyses = ",".join(p.stem for p in (CONF / "analysis").glob("*.yaml"))
    cases = [[f"defense=[{defenses}]", f"analysis=[{analyses}]"]]
    cases += [[f"{g}={p.stem}"] for g in ("train", "dataset", "model", "attack") for p in (CONF / g).glob("*.yaml")]
    # rgb_* presets are their own CPU scale: scale=cpu with them is refused on purpose
    # (tests/test_config.py::test_rgb_presets_are_their_own_cpu_scale)
    cases += [[f"experiment={p.stem}", f"scale={s}"] for p in (CONF / "experiment").glob("*.yaml")
              for s in ("full", "cpu") if s == "full" or not p.stem.startswith("rgb_")]
    for overrides in cases:
        validate_config(compose_cfg(overrides))


@pytest.mark.parametrize("node,message", [
    ({"seed": -1}, "run.seed=-1 is not allowed: use an integer >= 0 and <= 4294967295"),
    ({"threads": 0}, "run.threads=0 is not allowed: use an integer or null >= 1"),
    ({"screening": {"sizes": []}}, "run.screening.sizes=[] is not allowed: use a non-empty list"),
    ({"screening": {"ratios": [0.0]}}, "run.screening.ratios=[0.0] is not allowed: use a list of finite numbers > 0"),
    ({"progress": 1}, "run.progress=1 is not allowed: use true or false"),
])
def test_run_option_descriptions(node, message):
    assert message in RunOptions.problems(node, "run")


def test_pipeline_run_validates_before_any_work(tmp_path):
    with pytest.raises(ConfigError, match="train.epochs=0"):
        pipeline.run(compose_cfg(with_tiny("train.epochs=0")), tmp_path / "run")
    assert not (tmp_path / "run" / "results.json").exists()
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(ConfigError, match="the cache directory .* is a file"):
        check_run(compose_cfg(with_tiny(), cache_dir=blocker), tmp_path / "run2")


def test_the_write_probe_reports_a_full_disk(tmp_path, monkeypatch):
    def full(fd, data):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "write", full)
    with pytest.raises(ConfigError, match=r"cannot write the run directory .*: the disk is full"):
        probe_writable(tmp_path / "run", "the run directory", "hydra.run.dir")
    assert list((tmp_path / "run").iterdir()) == []  # the probe file is removed


def test_a_model_write_that_fails_leaves_the_old_file_and_no_temporary(tmp_path, monkeypatch):
    import torch

    from bdexp.cache import atomic_torch_save

    path = tmp_path / "models" / "m.pt"
    atomic_torch_save({"w": torch.zeros(2)}, path)
    before = path.read_bytes()

    def full_disk(obj, f, *args, **kwargs):
        Path(f).write_bytes(b"half")
        raise OSError(errno.ENOSPC, "No space left on device", str(f))

    monkeypatch.setattr(torch, "save", full_disk)
    with pytest.raises(OSError):
        atomic_torch_save({"w": torch.ones(2)}, path)
    assert path.read_bytes() == before and sorted(p.name for p in path.parent.iterdir()) == ["m.pt"]


def test_help_into_a_closed_pipe_is_not_reported_as_a_bug(tmp_path):
    """`bdexp --help | head -1`: the reader leaves early; bdexp exits quietly (141), no traceback."""
    import os
    import subprocess
    import sys

    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "bdexp", "--help"], cwd=tmp_path, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    proc.stdout.close()  # the pipe's reader is gone before bdexp writes
    _, err = proc.communicate(timeout=120)
    assert proc.returncode in (0, 141) and b"Traceback" not in err and b"bug" not in err


def test_a_run_dir_that_cannot_be_created_is_one_line(tmp_path):
    """Hydra makes the run directory before bdexp's task starts; /proc refuses new directories
    (ENOENT), which is the user's path, not a bug."""
    res = _cli([*with_tiny(), "hydra.run.dir=/proc/bdexp_cannot_be_here"], tmp_path)
    _assert_one_line(res, "cannot create the directory /proc/bdexp_cannot_be_here", "hydra.run.dir")


def test_ctrl_c_while_composing_is_one_line_and_exit_130(tmp_path, monkeypatch, capsys):
    """A SIGINT before pipeline.run installs its handlers (Hydra still composing) is one line, 130."""
    from bdexp import cli

    def interrupted():
        raise KeyboardInterrupt

    monkeypatch.setattr(cli, "_main", interrupted)
    with pytest.raises(SystemExit) as exit_info:
        cli.main()
    assert exit_info.value.code == 130
    err = capsys.readouterr().err
    assert "interrupted before the run started" in err and "Traceback" not in err


@pytest.mark.parametrize("override, needles", [
    ("defense.ac.criterion=foo", ["defense.ac.criterion='foo'", "reserve, size, silhouette"]),
    ("defense.ss.orient=up", ["defense.ss.orient='up'", "reserve, none"]),
])
def test_a_misspelt_decision_rule_stops_before_training(override, needles, tmp_path):
    res = _cli([*with_tiny("defense=[ac,ss]"), override, f"hydra.run.dir={tmp_path / 'run'}"], tmp_path)
    _assert_one_line(res, *needles)
