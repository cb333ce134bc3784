"""Interruptions lose nothing: SIGINT/SIGTERM during training, during a defense and
in a sweep leave results.json with status "interrupted" and the finished records, one line on
stderr and exit 130/143; the same command then resumes and ends complete. A corrupt results.json
in a sweep is re-run, not trusted."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from bdexp import jobs
from bdexp.results import PartialRecords, read_status
from tests.conftest import as_foreground, with_tiny

ROOT = Path(__file__).resolve().parents[2]
LINE = "; run the same command to resume"


def _cli(args, cwd, wait=True, timeout=300, module="bdexp"):
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", module, *args]
    if not wait:
        return subprocess.Popen(cmd, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                preexec_fn=as_foreground)
    return subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout,
                          preexec_fn=as_foreground)


def _wait_for(predicate, proc, what, limit=120.0):
    deadline = time.time() + limit
    while not predicate():
        if proc.poll() is not None or time.time() > deadline:
            proc.kill()
            out, err = proc.communicate()
            pytest.fail(f"never saw {what}; rc {proc.returncode}\n{out[-1500:]}\n{err[-1500:]}")
        time.sleep(0.01)


def _interrupt(proc, sig):
    proc.send_signal(sig)
    out, err = proc.communicate(timeout=120)
    return proc.returncode, out, err


def _partial_steps(cache: Path) -> list[str]:
    try:
        return [k for f in (cache / "partial").glob("*.json") for k in json.loads(f.read_text())["steps"]]
    except (OSError, ValueError, KeyError):  # being replaced right now
        return []


def _assert_one_line(err: str, expected: str):
    assert "Traceback" not in err, err[-3000:]
    lines = [ln for ln in err.splitlines() if ln.startswith("interrupted during")]
    assert lines == [expected], err[-3000:]


def test_sigint_during_training_keeps_the_epochs_and_resumes(tmp_path):
    cache = tmp_path / "cache"
    args = with_tiny("train.epochs=100", "dataset.train_size=128", f"cache.dir={cache}")
    proc = _cli([*args, f"hydra.run.dir={tmp_path / 'r1'}"], tmp_path, wait=False)
    ckpts = cache / "checkpoints"
    _wait_for(lambda: ckpts.exists() and any(ckpts.glob("*.pt")), proc, "a checkpoint")
    rc, out, err = _interrupt(proc, signal.SIGINT)
    assert rc == 130
    saved = torch.load(next(ckpts.glob("*.pt")), weights_only=True)["epoch"]
    assert 1 <= saved < 100 and not list(ckpts.glob(".*.tmp"))  # a whole checkpoint, no torn temporary
    _assert_one_line(err, f"interrupted during training at epoch {saved + 1}/100{LINE}")
    status, payload = read_status(tmp_path / "r1" / "results.json")
    assert status == "interrupted"
    assert payload["run"]["interrupted"] == {"where": f"training at epoch {saved + 1}/100", "signal": "SIGINT"}
    assert payload["metrics"] == [] and payload["run"]["attack"] == "patched"

    res = _cli([*args, f"hydra.run.dir={tmp_path / 'r2'}"], tmp_path)
    assert res.returncode == 0, res.stderr[-2000:]
    assert "resumed from" in res.stderr and f"after epoch {saved} of 100" in res.stderr  # log lines: stderr
    done = json.loads((tmp_path / "r2" / "results.json").read_text())
    assert done["status"] == "complete" and len(done["metrics"]) > 0


def test_sigterm_during_a_defense_keeps_the_finished_ones_and_the_rerun_skips_them(tmp_path):
    cache = tmp_path / "cache"
    # ss finishes in milliseconds; ss_train retrains for 100 epochs (about two seconds): the signal
    # arrives while it runs.
    args = with_tiny("defense=[ss,ss_train,sr]", "train.epochs=100", f"cache.dir={cache}")
    proc = _cli([*args, f"hydra.run.dir={tmp_path / 'r1'}"], tmp_path, wait=False)
    _wait_for(lambda: _partial_steps(cache) == ["defense:ss"], proc, "the ss records")
    rc, out, err = _interrupt(proc, signal.SIGTERM)
    assert rc == 143
    _assert_one_line(err, f"interrupted during defense ss_train (1 of 3 done){LINE}")
    status, payload = read_status(tmp_path / "r1" / "results.json")
    assert status == "interrupted" and payload["run"]["model_cache"] == "miss"
    kept = {r.get("defense") for r in payload["metrics"]}
    assert "ss" in kept and not kept & {"ss_train", "sr"}
    assert any(r["metric"] == "ba" for r in payload["metrics"])  # the evaluation before the defenses
    ss_records = [r for r in payload["metrics"] if r.get("defense") == "ss"]

    res = _cli([*args, f"hydra.run.dir={tmp_path / 'r2'}"], tmp_path)
    assert res.returncode == 0, res.stderr[-2000:]
    assert "defense ss: skipped" in res.stderr
    assert "defense ss_train: skipped" not in res.stderr
    done = json.loads((tmp_path / "r2" / "results.json").read_text())
    assert done["status"] == "complete" and done["run"]["model_cache"] == "hit"
    assert [r for r in done["metrics"] if r.get("defense") == "ss"] == ss_records
    assert {"ss", "ss_train", "sr"} <= {r.get("defense") for r in done["metrics"]}
    assert not any((cache / "partial").glob("*.json"))  # removed once results.json is complete


def test_interrupted_sweep_job_is_not_complete_and_a_corrupt_record_is_rerun(tmp_path):
    sweep, cache = tmp_path / "sweep", tmp_path / "cache"
    args = ["-m", *with_tiny("train.epochs=150", "dataset.train_size=128"), "attack.target=0,1",
            f"cache.dir={cache}", f"hydra.sweep.dir={sweep}"]
    proc = _cli(args, tmp_path, wait=False)
    ckpts = cache / "checkpoints"
    _wait_for(lambda: (sweep / "0" / "results.json").exists() and any(ckpts.glob("*.pt")), proc, "job 1 training")
    rc, out, err = _interrupt(proc, signal.SIGTERM)
    assert rc == 143
    assert "Traceback" not in err and "interrupted during training at epoch" in err
    assert read_status(sweep / "0" / "results.json")[0] == "complete"
    assert read_status(sweep / "1" / "results.json")[0] == "interrupted"
    digest = read_status(sweep / "1" / "results.json")[1]["run"]["config_hash"]
    assert not jobs.completed(sweep / "1", digest)
    stamp = (sweep / "0" / "results.json").stat().st_mtime_ns

    again = _cli(args, tmp_path)
    assert again.returncode == 0, again.stderr[-2000:]
    assert "resumed from" in again.stderr and "1 complete, 1 skipped" in again.stdout  # log / result
    assert (sweep / "0" / "results.json").stat().st_mtime_ns == stamp
    assert read_status(sweep / "1" / "results.json")[0] == "complete"

    (sweep / "0" / "results.json").write_text('{"status": "complete", "run": {"config_h')  # truncated
    (sweep / "1" / "results.json").write_bytes(os.urandom(300))
    assert read_status(sweep / "0" / "results.json")[0] == "unreadable"
    third = _cli(args, tmp_path)
    assert third.returncode == 0 and "Traceback" not in third.stderr, third.stderr[-2000:]
    assert "2 complete" in third.stdout  # both re-run (from the cached models), none trusted
    (sweep / "1" / "results.json").write_bytes(os.urandom(300))
    report = _cli([str(sweep), "--out", str(tmp_path / "rep")], tmp_path, module="bdexp.report.cli")
    assert report.returncode == 0 and "Traceback" not in report.stderr, report.stderr[-2000:]
    assert "unreadable" in report.stdout + report.stderr


def test_partial_records_belong_to_one_config_and_model(tmp_path):
    store = PartialRecords(tmp_path / "p.json", "abc")
    store.bind("model-1")
    store.put("defense:ss", [{"metric": "f1", "value": 0.5}])
    assert PartialRecords(tmp_path / "p.json", "abc").bind("model-1") == 1
    assert PartialRecords(tmp_path / "p.json", "abc").bind("model-2") == 0  # another model: recompute
    assert PartialRecords(tmp_path / "p.json", "xyz").bind("model-1") == 0
    (tmp_path / "p.json").write_text('{"config_hash": "abc", "st')
    assert PartialRecords(tmp_path / "p.json", "abc").bind("model-1") == 0
    assert not list(tmp_path.glob(".*.tmp"))


def test_a_skipped_step_brings_its_files_into_the_new_run_dir(tmp_path):
    first, second = tmp_path / "r1", tmp_path / "r2"
    first.mkdir()
    store = PartialRecords(tmp_path / "p.json", "abc", first)
    store.bind("m")
    before = store.listing()
    (first / "nc_masks.png").write_bytes(b"png")
    store.put("defense:nc", [{"metric": "target_flagged", "value": 1.0}], files=store.listing() - before)
    again = PartialRecords(tmp_path / "p.json", "abc", second)
    assert again.bind("m") == 1
    assert again.get("defense:nc") == [{"metric": "target_flagged", "value": 1.0}]
    assert (second / "nc_masks.png").read_bytes() == b"png"


def test_a_signal_inside_deferred_waits_for_the_block(tmp_path):
    """A checkpoint or record being written is finished first; the signal is acted on after it."""
    order = []
    with pytest.raises(jobs.Interrupted) as caught:
        with jobs.interruptible():
            with jobs.deferred():
                os.kill(os.getpid(), signal.SIGTERM)
                time.sleep(0.05)
                order.append("block finished")
            order.append("after the block")
    assert order == ["block finished"] and caught.value.exit_code == 143
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # the handlers are put back


def test_an_interrupt_mid_epoch_keeps_the_last_saved_epoch(tmp_path):
    """Half an epoch is never saved: with checkpoint_every=2, a signal in epoch 4 leaves epoch 2."""
    from bdexp.data.loader import DeviceLoader
    from bdexp.models import build_model
    from bdexp.training.base import Regime
    from bdexp.training.loop import train_model
    from tests.conftest import compose_cfg

    cfg = compose_cfg(with_tiny("train.epochs=5", "model.width=0.25"))
    torch.manual_seed(0)
    x, y = (torch.rand(64, 1, 8, 8) * 255).to(torch.uint8), torch.randint(0, 4, (64,))
    model = build_model(cfg.model, in_channels=1, num_classes=4, image_size=8, mean=[0.5], std=[0.25])
    loader = DeviceLoader(x, y, batch_size=32, device=torch.device("cpu"), seed=3, drop_last=True)

    class Signalled(Regime):
        calls = 0

        def loss(self, model, batch):
            Signalled.calls += 1
            if Signalled.calls == 3 * len(loader) + 1:  # first step of epoch 4
                raise jobs.Interrupted(signal.SIGINT)
            return super().loss(model, batch)

    with pytest.raises(jobs.Interrupted) as caught:
        train_model(model, loader, Signalled(cfg.train), cfg.train, torch.device("cpu"),
                    checkpoint=tmp_path / "c.pt", checkpoint_every=2)
    assert caught.value.where == "training at epoch 4/5"
    assert torch.load(tmp_path / "c.pt", weights_only=True)["epoch"] == 2
