"""End to end on tiny data: in process (fast) and through the real `bdexp` CLI."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from bdexp import pipeline
from bdexp.report.cli import report
from tests.conftest import TINY

BDEXP = [sys.executable, "-m", "bdexp"]


def _metrics(payload):
    return {r["metric"]: r["value"] for r in payload["metrics"] if "defense" not in r and "analysis" not in r}


def test_tiny_run_learns_the_backdoor_and_writes_results(tiny_cfg, tmp_path):
    out = pipeline.run(tiny_cfg("train.epochs=6"), tmp_path / "run")
    m = _metrics(out)
    assert m["ba"] > 0.9 and m["asr"] > 0.9
    saved = json.loads((tmp_path / "run" / "results.json").read_text())
    assert saved["status"] == "complete"
    assert saved["run"]["attack"] == "patched" and saved["run"]["config"]["dataset"]["name"] == "synthetic"
    assert _metrics(saved) == m


def test_the_run_record_names_its_identity_and_the_report_reads_it(tiny_cfg, tmp_path):
    """results.json holds the options that differ from the methods' defaults (results.run_identity)
    and the case keys; a report over two runs splits rows on the one they differ in."""
    for i, rate in enumerate((0.2, 0.3)):
        pipeline.run(tiny_cfg("train.epochs=1", f"attack.poison_rate={rate}"), tmp_path / "sweep" / str(i))
    run = json.loads((tmp_path / "sweep" / "0" / "results.json").read_text())["run"]
    assert run["attack"] == "patched" and run["attack.poison_rate"] == 0.2 and run["regime"] == "standard"
    assert "attack.poison_rate" in run["case_keys"] and "seed" not in run["case_keys"]
    table = report(tmp_path / "sweep", tmp_path / "out", "runs")["csv"].read_text()
    assert "attack.poison_rate" in table.splitlines()[0] and "0.3" in table


def test_clean_model_has_low_asr(tiny_cfg, tmp_path):
    m = _metrics(pipeline.run(tiny_cfg("attack=none", "train.epochs=6"), tmp_path))
    assert m["ba"] > 0.9 and "asr" not in m


def test_one_to_one_reports_tmr(tiny_cfg, tmp_path):
    m = _metrics(pipeline.run(tiny_cfg("attack.mode=one_to_one", "attack.source=1", "attack.poison_rate=0.5",
                                       "train.epochs=6"), tmp_path))
    assert 0.0 <= m["tmr"] <= m["asr"] <= 1.0 and m["tmr"] > 0.5


def test_cache_hit_trains_nothing(tiny_cfg, tmp_path):
    first = pipeline.run(tiny_cfg(cache=True), tmp_path / "a")
    second = pipeline.run(tiny_cfg(cache=True), tmp_path / "b")
    assert first["run"]["model_cache"] == "miss" and second["run"]["model_cache"] == "hit"
    assert _metrics(first) == _metrics(second)
    other = pipeline.run(tiny_cfg("seed=1", cache=True), tmp_path / "c")
    assert other["run"]["model_cache"] == "miss"


def test_nan_loss_stops_with_a_message(tiny_cfg, tmp_path):
    from bdexp.errors import TrainingDiverged

    with pytest.raises(TrainingDiverged, match="lower the learning rate"):
        pipeline.run(tiny_cfg("train.lr=1e30"), tmp_path)


def _cli(args, cwd, env_extra=None, timeout=300):
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1]), **(env_extra or {})}
    return subprocess.run([*BDEXP, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)


def test_cli_run_then_cached_rerun_then_report(tmp_path):
    args = [*TINY, f"cache.dir={tmp_path / 'cache'}", "progress=true"]
    first = _cli([*args, f"hydra.run.dir={tmp_path / 'r1'}"], tmp_path)
    assert first.returncode == 0, first.stderr[-3000:]
    assert "ba" in first.stdout and (tmp_path / "r1" / "results.json").exists()
    second = _cli([*args, f"hydra.run.dir={tmp_path / 'r2'}"], tmp_path)
    assert second.returncode == 0, second.stderr[-3000:]
    assert "loaded cached model" in second.stdout + second.stderr
    written = report(tmp_path, tmp_path / "report", "runs")
    text = written["md"].read_text()
    assert text.count("| synthetic |") == 2 and "Provenance: 2 complete run(s)" in text
    assert written["csv"].exists() and written["tex"].exists()


def test_cli_bad_input_gives_one_clear_message(tmp_path):
    res = _cli(["dataset=imagefolder", f"dataset.root={tmp_path / 'nowhere'}", "device=cpu",
                f"hydra.run.dir={tmp_path / 'r'}"], tmp_path)
    assert res.returncode == 2  # errors on stderr, one line; stdout carries results only
    assert "imagefolder" in res.stderr and str(tmp_path / "nowhere") in res.stderr
    assert "Traceback" not in res.stdout + res.stderr
    res = _cli(["attack.mode=one_to_one", "device=cpu", f"hydra.run.dir={tmp_path / 'r2'}"], tmp_path)
    assert res.returncode == 2 and "source" in res.stderr


@pytest.mark.parametrize("launcher", ["basic", "joblib", "submitit_local"])
def test_multirun_one_job_per_attack(tmp_path, launcher):
    sweep = tmp_path / "sweep"
    args = ["-m", *TINY, "train.epochs=1", "attack=patched,blended", "cache.enabled=false",
            f"hydra.sweep.dir={sweep}", f"hydra/launcher={launcher}"]
    if launcher == "joblib":
        args.append("hydra.launcher.n_jobs=2")
    res = _cli(args, tmp_path)
    assert res.returncode == 0, res.stderr[-3000:]
    runs = sorted(sweep.rglob("results.json"))
    assert len(runs) == 2
    assert {json.loads(p.read_text())["run"]["attack"] for p in runs} == {"patched", "blended"}


def test_fashion_mnist_run_from_debian_files(tmp_path):
    """Real data, never skipped: CI installs Debian's dataset-fashion-mnist."""
    from tests.conftest import compose_cfg

    cfg = compose_cfg(["dataset=fashion_mnist", "dataset.root=" + str(tmp_path / "empty"), "dataset.download=false",
                       "dataset.train_limit=3000", "dataset.test_limit=500", "train.epochs=12",
                       "train.batch_size=64", "train.lr=0.05", "progress=false", "device=cpu"])
    out = pipeline.run(cfg, tmp_path / "run")
    m = _metrics(out)
    assert out["run"]["n_train"] == 3000 and out["run"]["n_poison"] == 300
    assert m["ba"] > 0.7 and m["asr"] > 0.9  # measured 0.822 / 1.0


def test_a_collapsed_model_is_named_in_one_warning(caplog):
    """A model that predicts one class for >= 90 % of the clean test set gets one warning naming λ."""
    import logging

    import torch
    from omegaconf import OmegaConf

    from bdexp.pipeline import warn_if_collapsed

    cfg = OmegaConf.create({"train": {"name": "mlmmdr", "mmd_weight": 1.0}})
    with caplog.at_level(logging.WARNING):
        warn_if_collapsed(torch.tensor([3] * 95 + [1] * 5), 10, cfg)
    assert len(caplog.records) == 1 and "95 %" in caplog.text and "train.mmd_weight=1.0" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        warn_if_collapsed(torch.arange(100) % 10, 10, cfg)  # every class predicted: no warning
    assert not caplog.records
