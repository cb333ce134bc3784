"""bdexp's Python API (bdexp/api.py): compose gives the CLI's config and checks, run writes the
CLI's results.json and returns them, load/collect give bdexp-report's DataFrame, the README's
example runs as written, and `import bdexp` stays cheap."""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import yaml
from omegaconf import OmegaConf, open_dict

import bdexp
from bdexp.errors import ConfigError
from bdexp.report.collect import collect as report_collect
from tests.conftest import with_tiny

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"


def _env(**extra: str) -> dict:
    return {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", **extra}


def _cli_config(*overrides: str) -> dict:
    """The job config `bdexp <overrides>` would run (`--cfg job` prints it and stops)."""
    out = subprocess.run([sys.executable, "-m", "bdexp", "--cfg", "job", *overrides], cwd=ROOT, env=_env(),
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    return yaml.safe_load(out.stdout)


def _tiny(*overrides: str) -> list[str]:
    return with_tiny("train.epochs=1", "cache.enabled=false", *overrides)


def test_import_bdexp_is_cheap_and_exposes_the_api():
    code = ("import bdexp, sys; heavy = [m for m in ('torch', 'pandas', 'hydra') if m in sys.modules]; "
            "assert not heavy, heavy; "
            "assert all(callable(getattr(bdexp, n)) for n in ('compose', 'run', 'load', 'collect')); "
            "assert bdexp.__version__")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr[-2000:]


def test_compose_gives_the_cli_config():
    assert OmegaConf.to_container(bdexp.compose()) == _cli_config()
    overrides = ["attack=blended", "train.epochs=3", "defense=[ac]"]
    cfg = bdexp.compose(overrides)
    assert OmegaConf.to_container(cfg) == _cli_config(*overrides)
    assert "hydra" not in cfg and cfg.attack.name == "blended" and list(cfg.defense) == ["ac"]
    assert bdexp.compose("train.epochs=3").train.epochs == 3  # one override as a string


def test_compose_honours_presets():
    cfg = bdexp.compose(["experiment=mlmmdr_aro"])
    assert cfg.train.name == "mlmmdr" and cfg.train.mmd_weight == 0.0
    assert cfg.defense.ac.n_components == 20 and list(cfg.analysis) == ["distances"]


@pytest.mark.parametrize("override, key", [
    ("train.epochs=abc", "train.epochs"),  # a value of the wrong type (bdexp/validation.py)
    ("attack.poison_rate=2", "attack.poison_rate"),  # out of range
    ("train.epoch=3", "train.epoch"),  # a misspelt key (Hydra)
    ("attack=nope", "attack"),  # an unknown option (Hydra)
    ("train.lr=inf", "train.lr=inf is not allowed: use a finite number > 0"),  # would train to a NaN loss
    ("train.weight_decay=inf", "train.weight_decay=inf is not allowed: use a finite number >= 0"),
    ("attack.poison_rate=nan", "attack.poison_rate=nan is not allowed"),
    ("+trian.epochs=5", "unknown top-level key(s) trian"),  # Hydra's own fix for a misspelt key
    ("+defense.acc.n_components=20", "defense.acc names no defense"),  # a misspelt defense's settings
    ("+analysis.distance.set_size=9", "analysis.distance names no analysis"),
    ("seed=" + "9" * 5000, "seed=<5000 digits> holds an integer of 5000 digits"),  # Python reads <= 4300
])
def test_compose_refuses_a_bad_value_naming_the_key(override, key):
    with pytest.raises(ConfigError, match=re.escape(key)):
        bdexp.compose([override])


def test_compose_leaves_a_running_hydra_alone(tmp_path):
    """Called inside another Hydra app (its GlobalHydra initialized), compose leaves that app's
    state as it was; with none, none is left behind; and it can be called again and again."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from hydra.core.utils import JobRuntime
    from hydra.version import getbase

    GlobalHydra.instance().clear()
    bdexp.compose()
    assert not GlobalHydra.instance().is_initialized()
    (tmp_path / "other.yaml").write_text("a: 1\n")
    with initialize_config_dir(config_dir=str(tmp_path), version_base="1.2", job_name="their_app"):
        theirs = GlobalHydra.instance()
        for _ in range(2):
            assert bdexp.compose(["seed=3"]).seed == 3
        with pytest.raises(ConfigError):
            bdexp.compose(["attack=nope"])
        assert GlobalHydra.instance() is theirs and theirs.is_initialized()
        assert JobRuntime.instance().get("name") == "their_app" and str(getbase()) == "1.2"
        assert compose("other").a == 1


APP = """
import hydra
from hydra.core.hydra_config import HydraConfig
import bdexp

@hydra.main(version_base="1.3", config_path=".", config_name="app")
def main(cfg):
    composed = bdexp.compose([f"seed={cfg.x}"])
    print("job", HydraConfig.get().job.name, HydraConfig.get().job.num, cfg.x, composed.seed, composed.attack.name)

main()
"""


def test_compose_inside_a_hydra_app_sweep(tmp_path):
    """A user's own @hydra.main sweep that composes bdexp configs in its jobs: every job keeps
    its app's name and config."""
    (tmp_path / "app.yaml").write_text("x: 0\n")
    (tmp_path / "my_app.py").write_text(APP)
    out = subprocess.run([sys.executable, "my_app.py", "-m", "x=1,2", f"hydra.sweep.dir={tmp_path / 'multirun'}"],
                         cwd=tmp_path, env=_env(), capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-3000:]
    jobs = [line.split() for line in out.stdout.splitlines() if line.startswith("job ")]
    assert jobs == [["job", "my_app", "0", "1", "1", "patched"], ["job", "my_app", "1", "2", "2", "patched"]]


@pytest.fixture(scope="module")
def sweep(tmp_path_factory):
    """Two tiny runs in one folder: one from overrides, one from a composed (and edited) config."""
    root = tmp_path_factory.mktemp("api") / "sweep"
    first = bdexp.run(_tiny("attack.poison_rate=0.2"), run_dir=root / "0")
    cfg = bdexp.compose(_tiny())
    cfg.attack.poison_rate = 0.3
    second = bdexp.run(cfg, root / "1")
    return root, [first, second]


def test_run_writes_results_json_and_returns_them(sweep):
    root, (first, second) = sweep
    saved = json.loads((root / "0" / "results.json").read_text())
    assert saved["status"] == "complete" and first.status == "complete"
    assert first.run == saved["run"] and first.metrics == saved["metrics"] and first.run_dir == root / "0"
    ba = next(r["value"] for r in saved["metrics"] if r["metric"] == "ba")
    assert first.metric("ba") == ba
    assert first.records.loc[first.records["metric"].eq("ba"), "value"].tolist() == [ba]
    pd.testing.assert_frame_equal(first.records, report_collect(root / "0" / "results.json"))
    assert second.run["attack.poison_rate"] == 0.3 and second.run["config"]["attack"]["poison_rate"] == 0.3
    assert saved["run"]["config_hash"]  # as the CLI records it: a re-run of the same config is skipped
    text = repr(first)
    assert "synthetic · convnet · patched · standard: BA " in text and ", ASR " in text and "\n" not in text
    assert str(first).startswith("synthetic · convnet · patched · standard: BA ")


def test_metric_picks_one_record_or_says_what_is_missing(sweep):
    _, (first, _) = sweep
    first.metrics.append({"metric": "ba", "value": 0.5, "defense": "x", "pool": "a"})
    first.metrics.append({"metric": "ba", "value": 0.6, "defense": "x", "pool": "b"})
    try:
        assert first.metric("ba") != 0.5  # the run's own BA, not a defense's
        assert first.metric("ba", defense="x", pool="b") == 0.6
        with pytest.raises(ValueError, match="pool"):
            first.metric("ba", defense="x")
        with pytest.raises(KeyError, match="no record 'nope'"):
            first.metric("nope")
        assert first.metric("nope", default=None) is None
    finally:
        del first.metrics[-2:]


def test_a_rerun_of_the_same_config_in_its_dir_is_not_computed_again(sweep):
    root, (first, _) = sweep
    before = (root / "0" / "results.json").stat().st_mtime_ns
    again = bdexp.run(_tiny("attack.poison_rate=0.2"), root / "0")
    assert (root / "0" / "results.json").stat().st_mtime_ns == before and again.run == first.run


def test_load_and_collect_are_the_report_frame(sweep):
    root, _ = sweep
    pd.testing.assert_frame_equal(bdexp.load(root / "0"), report_collect(root / "0" / "results.json"))
    pd.testing.assert_frame_equal(bdexp.load(root / "0" / "results.json"), report_collect(root / "0" / "results.json"))
    df = bdexp.collect(root)
    pd.testing.assert_frame_equal(df, report_collect(root))
    assert set(df["attack.poison_rate"]) == {0.2, 0.3}  # the key the two runs differ in
    with pytest.raises(FileNotFoundError):
        bdexp.load(root / "missing")
    with pytest.raises(FileNotFoundError):
        bdexp.collect(root / "missing")


def test_run_without_a_dir_makes_a_fresh_dated_one(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ConfigError, match="train.epochs"):
        bdexp.run(_tiny("train.epochs=abc"))
    assert not (tmp_path / "outputs").exists()  # a bad config makes no run directory
    a, b = bdexp.run(_tiny()), bdexp.run(_tiny())
    assert a.run_dir != b.run_dir  # two runs in the same second do not share one
    for res in (a, b):
        assert res.run_dir.parts[:2] == ("outputs", "runs") and len(res.run_dir.parts) == 4
        assert (tmp_path / res.run_dir / "results.json").is_file()
    mine = bdexp.run(_tiny(f"hydra.run.dir={tmp_path / 'mine'}"))
    assert mine.run_dir == tmp_path / "mine"


def test_the_readme_example_runs_as_written(tmp_path):
    m = re.search(r"<!-- api-example -->\s*```python\n(.*?)```", README.read_text(), re.S)
    assert m, "README has no api-example block"
    code = m.group(1)
    assert len(code.strip().splitlines()) == 5
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=300,
                         env=_env(BDEXP_CACHE_DIR=str(tmp_path / "cache"), COLUMNS="120"))
    assert out.returncode == 0, out.stderr[-3000:]
    assert re.search(r"^digits · convnet · blended · standard: BA [01]\.\d+, ASR [01]\.\d+$", out.stdout, re.M), out.stdout[-2000:]
    assert list((tmp_path / "outputs" / "runs").glob("*/*/results.json"))


@pytest.mark.parametrize("bad, said", [
    (123, "not int 123"), ({"attack": "blended"}, "not dict"), ([1], "an override is a 'key=value' string, not int"),
    (b"attack=blended", "not bytes"),
])
def test_run_and_compose_refuse_what_is_not_a_config(bad, said):
    for call in (bdexp.run, bdexp.compose):
        with pytest.raises(ConfigError, match=re.escape(said)):
            call(bad)


def test_a_config_without_a_method_group_is_refused(tmp_path):
    cfg = bdexp.compose(_tiny())
    with open_dict(cfg):
        del cfg["train"]
    with pytest.raises(ConfigError, match=r"the config has no train \(a `train` node"):
        bdexp.run(cfg, tmp_path / "r")
    assert not (tmp_path / "r" / "results.json").exists()


def test_runs_from_several_threads_get_what_they_would_get_alone(tmp_path):
    """Hydra's compose API and a run's seeding are process-wide: calls from threads are served one at a
    time, and each gets exactly the numbers of the same run made alone."""
    import threading

    alone = bdexp.run(_tiny("seed=1"), tmp_path / "alone")
    results, errors = {}, []

    def go(i):
        try:
            results[i] = bdexp.run(_tiny(f"seed={i}"), tmp_path / f"t{i}")
        except Exception as err:  # noqa: BLE001 - collected and asserted below
            errors.append(err)

    threads = [threading.Thread(target=go, args=(i,)) for i in range(3)]
    [t.start() for t in threads]
    [t.join() for t in threads]
    assert not errors and sorted(results) == [0, 1, 2]
    assert results[1].metrics == alone.metrics


def test_another_config_into_a_run_dir_with_complete_results_is_refused(sweep):
    root, (first, _) = sweep
    before = (root / "0" / "results.json").read_bytes()
    with pytest.raises(ConfigError, match="already holds complete results of another config"):
        bdexp.run(_tiny("attack.poison_rate=0.25"), root / "0")
    assert (root / "0" / "results.json").read_bytes() == before
