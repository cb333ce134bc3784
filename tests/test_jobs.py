"""Nothing lost: error records, skipping complete jobs, resuming a killed training, and
one training for concurrent jobs that need the same model."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import torch

from bdexp import jobs
from bdexp.cache import ModelCache
from bdexp.data.loader import DeviceLoader
from bdexp.models import build_model
from bdexp.training.base import Regime
from bdexp.training.loop import train_model
from tests.conftest import TINY, compose_cfg, with_tiny

BDEXP = [sys.executable, "-m", "bdexp"]
ROOT = Path(__file__).resolve().parents[1]


def _cli(args, cwd, timeout=300, wait=True):
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    cmd = [*BDEXP, *args]
    if not wait:
        return subprocess.Popen(cmd, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    return subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)


def test_config_hash_ignores_presentation_but_not_content():
    base = compose_cfg(with_tiny())
    assert jobs.config_hash(base) == jobs.config_hash(compose_cfg(with_tiny("progress=true", "device=cuda")))
    assert jobs.config_hash(base) != jobs.config_hash(compose_cfg(with_tiny("seed=1")))
    assert jobs.config_hash(base) != jobs.config_hash(compose_cfg(with_tiny("attack.poison_rate=0.2")))


def test_failing_job_leaves_a_record_and_a_rerun_skips_the_complete_ones(tmp_path):
    sweep = tmp_path / "sweep"
    args = ["-m", *TINY, "train.epochs=1", "attack.poison_rate=0.1,5.0,0.2", f"cache.dir={tmp_path / 'c'}",
            f"hydra.sweep.dir={sweep}"]
    first = _cli(args, tmp_path)
    assert first.returncode == 1, first.stdout[-2000:] + first.stderr[-2000:]  # the sweep reports the failure
    payloads = {d.name: json.loads((d / "results.json").read_text()) for d in sorted(sweep.iterdir()) if d.is_dir()}
    assert [p["status"] for p in payloads.values()] == ["complete", "failed", "complete"]
    err = payloads["1"]["run"]["error"]
    assert err["type"] == "ConfigError" and "poison_rate=5.0" in err["message"]
    # the failed job's identity (results.run_identity): the option that differs from the default
    assert payloads["1"]["run"]["attack.poison_rate"] == 5.0 and payloads["1"]["run"]["attack"] == "patched"
    assert "2 complete, 1 failed" in first.stdout
    stamps = {n: (sweep / n / "results.json").stat().st_mtime_ns for n in ("0", "2")}

    second = _cli(args, tmp_path)
    assert second.returncode == 1
    assert "2 skipped, 1 failed" in second.stdout
    assert {n: (sweep / n / "results.json").stat().st_mtime_ns for n in ("0", "2")} == stamps  # untouched

    # a changed config is not "complete for the same config": job 0 runs again
    third = _cli([a.replace("train.epochs=1", "train.epochs=2") for a in args[:-1]] + [f"hydra.sweep.dir={sweep}"],
                 tmp_path)
    assert "3 " not in third.stdout.split("sweep")[-1].split("skipped")[0]  # nothing skipped
    assert (sweep / "0" / "results.json").stat().st_mtime_ns != stamps["0"]
    # ... and the complete results of the earlier config are kept beside the new ones, not replaced
    kept = sweep / "0" / f"results.{payloads['0']['run']['config_hash']}.json"
    assert json.loads(kept.read_text()) == payloads["0"] and kept.stat().st_mtime_ns == stamps["0"]
    assert "kept as results." in third.stdout + third.stderr


def test_an_edited_results_json_is_not_trusted(tmp_path):
    """A complete results.json whose numbers were changed by hand after the run is not skipped on a
    re-run: it is computed again, the edited file kept beside it, and the report never shows it."""
    import bdexp

    overrides = [*TINY, "train.epochs=1", f"cache.dir={tmp_path / 'c'}"]
    bdexp.run(overrides, run_dir=tmp_path / "run")  # in this process: the CLI's results.json, sooner
    args = [*overrides, f"hydra.run.dir={tmp_path / 'run'}"]
    path = tmp_path / "run" / "results.json"
    computed = json.loads(path.read_text())
    edited = json.loads(path.read_text())
    ba = next(r for r in edited["metrics"] if r["metric"] == "ba")
    ba["value"] = 1.0 if ba["value"] != 1.0 else 0.5
    path.write_text(json.dumps(edited))
    from bdexp.report.collect import collect

    assert collect(tmp_path / "run").empty  # skipped, with a warning naming it
    again = _cli(args, tmp_path)
    assert again.returncode == 0 and "edited after the run" in again.stdout + again.stderr
    assert json.loads(path.read_text())["metrics"] == computed["metrics"]  # the same model, the same numbers
    assert json.loads((tmp_path / "run" / f"results.{computed['run']['config_hash']}.edited.json").read_text()) == edited


class Interrupt(Exception):
    pass


class InterruptingRegime(Regime):
    """Cross-entropy that raises after `stop_after` steps (a kill mid-way through an epoch)."""

    def __init__(self, cfg, stop_after):
        super().__init__(cfg)
        self.calls, self.stop_after = 0, stop_after

    def loss(self, model, batch):
        self.calls += 1
        if self.calls > self.stop_after:
            raise Interrupt
        return super().loss(model, batch)


def _setup(cfg):
    torch.manual_seed(0)
    x = (torch.rand(192, 1, 16, 16) * 255).to(torch.uint8)
    y = torch.randint(0, 4, (192,))
    model = build_model(cfg.model, in_channels=1, num_classes=4, image_size=16, mean=[0.5], std=[0.25])
    loader = DeviceLoader(x, y, batch_size=32, device=torch.device("cpu"), seed=3, crop_padding=2, flip=True,
                          drop_last=True)
    return model, loader


def test_interrupted_training_resumes_to_the_same_weights(tmp_path):
    cfg = compose_cfg(with_tiny("train.epochs=4", "model.width=0.25"))
    model, loader = _setup(cfg)
    train_model(model, loader, Regime(cfg.train), cfg.train, torch.device("cpu"))
    reference = {k: v.clone() for k, v in model.state_dict().items()}

    ckpt = tmp_path / "ckpt.pt"
    model, loader = _setup(cfg)
    steps = len(loader)
    try:  # killed in the middle of epoch 3: epochs 1-2 are checkpointed
        train_model(model, loader, InterruptingRegime(cfg.train, stop_after=2 * steps + 2), cfg.train,
                    torch.device("cpu"), checkpoint=ckpt)
    except Interrupt:
        pass
    assert torch.load(ckpt, weights_only=True)["epoch"] == 2
    torch.manual_seed(1234)  # a new process: different global RNG state, fresh model and loader
    model, loader = _setup(cfg)
    regime = InterruptingRegime(cfg.train, stop_after=10**9)
    history = train_model(model, loader, regime, cfg.train, torch.device("cpu"), checkpoint=ckpt)
    assert regime.calls == 2 * steps  # only epochs 3 and 4 were trained
    assert len(history["loss"]) == 4
    for k, v in model.state_dict().items():
        assert torch.equal(v, reference[k]), k


def test_killed_run_resumes_from_its_checkpoint(tmp_path):
    cache = tmp_path / "cache"
    args = [*TINY, "train.epochs=40", "dataset.train_size=128", f"cache.dir={cache}"]
    proc = _cli([*args, f"hydra.run.dir={tmp_path / 'r1'}"], tmp_path, wait=False)
    deadline = time.time() + 120
    ckpts = cache / "checkpoints"
    while time.time() < deadline and not (ckpts.exists() and any(ckpts.glob("*.pt"))):
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    saved = torch.load(next(ckpts.glob("*.pt")), weights_only=True)["epoch"]
    assert 1 <= saved < 40 and not any((cache / "models").glob("*.pt"))
    res = _cli([*args, f"hydra.run.dir={tmp_path / 'r2'}"], tmp_path)
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-2000:]
    assert "resumed from" in res.stdout + res.stderr
    out = json.loads((tmp_path / "r2" / "results.json").read_text())
    assert out["status"] == "complete" and out["run"]["model_cache"] == "miss"
    assert not any(ckpts.glob("*.pt"))  # removed once the model is stored
    assert len(list((cache / "models").glob("*.pt"))) == 1


def test_concurrent_jobs_train_a_shared_model_once(tmp_path):
    cache = tmp_path / "cache"
    args = [*TINY, "train.epochs=30", f"cache.dir={cache}"]
    procs = [_cli([*args, f"hydra.run.dir={tmp_path / f'r{i}'}"], tmp_path, wait=False) for i in range(2)]
    for p in procs:
        p.wait(timeout=300)
        assert p.returncode == 0, p.stdout.read()[-2000:]
    sources = sorted(json.loads((tmp_path / f"r{i}" / "results.json").read_text())["run"]["model_cache"]
                     for i in range(2))
    assert sources == ["hit", "miss"]
    stored = list((cache / "models").glob("*.pt"))
    assert len(stored) == 1 and torch.load(stored[0], weights_only=True)["state_dict"]


def test_pinning_and_threads():
    assert jobs.pinned_device("cpu", 3) == "cpu"
    assert jobs.pinned_device("auto", None) == "auto"
    assert jobs.job_threads(None, None) is None
    assert jobs.job_threads(3, 8) == 3
    assert jobs.job_threads(None, (os.cpu_count() or 1) * 4) == 1


def test_cache_lock_is_reentrant_across_keys(tmp_path):
    cache = ModelCache(tmp_path)
    with cache.lock("a"), cache.lock("b"):
        assert (tmp_path / "locks" / "a.lock").exists()


def test_a_checkpoint_that_does_not_load_changes_nothing(tmp_path):
    """PyTorch copies the matching tensors before it raises: a checkpoint of another format must
    leave the fresh model, the optimizer and the RNGs exactly as they were (no half-loaded weights)."""
    import pytest
    from omegaconf import OmegaConf

    from bdexp.training.loop import Optimization, load_checkpoint

    cfg = OmegaConf.create({"lr": 0.1, "momentum": 0.9, "weight_decay": 0.0, "milestones": [0.5], "gamma": 0.1,
                            "epochs": 2})
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 3)
    trained = torch.nn.Linear(4, 3)
    torch.save({"key": "old", "model": trained.state_dict(), "epoch": 1}, tmp_path / "old.pt")  # no optimizer state
    torch.save({"key": "another", "model": trained.state_dict(), "epoch": 1}, tmp_path / "copied.pt")
    fresh = {k: v.clone() for k, v in model.state_dict().items()}
    optim = Optimization(model, cfg)
    loader = DeviceLoader(torch.zeros(8, 1, 2, 2, dtype=torch.uint8), torch.zeros(8, dtype=torch.long),
                          batch_size=4, device=torch.device("cpu"), seed=0)
    rng = torch.get_rng_state()
    with pytest.raises(KeyError):
        load_checkpoint(tmp_path / "old.pt", model, optim, loader)
    assert all(torch.equal(model.state_dict()[k], fresh[k]) for k in fresh)
    with pytest.raises(ValueError, match="checkpoint of model another, not of copied"):  # another model's
        load_checkpoint(tmp_path / "copied.pt", model, optim, loader)
    assert all(torch.equal(model.state_dict()[k], fresh[k]) for k in fresh)
    assert optim.epochs_done == 0 and torch.equal(torch.get_rng_state(), rng)
