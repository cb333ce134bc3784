"""A sanitizer retrains with the DEFENDER's regime (training/defender.py; ISPL §3.1, App. D.2.1),
never with the run's regime, which under train=mlmmdr is the attacker's and reads poison flags;
runs whose model the attacker trained mark their sanitizer records (threat_model_conflict)."""
from __future__ import annotations

import logging

import pytest
import torch

from bdexp import pipeline
from bdexp.data.loader import DeviceLoader
from bdexp.errors import ConfigError
from bdexp.models import build_model
from bdexp.training.base import Regime
from bdexp.training.defender import DefenderLoader, PoisonFlagsHidden, defender_train_cfg
from bdexp.training.loop import train_model
from bdexp.training.mmdr import MMDRegime
from tests.conftest import compose_cfg, with_tiny

CONFLICT = "threat models do not compose"


def _by_defense(out, name):
    return [r for r in out["metrics"] if r.get("defense") == name]


def _values(rows):
    return {r["metric"]: r["value"] for r in rows}


def test_retrain_under_mlmmdr_is_standard_and_never_reads_poison(tiny_cfg, tmp_path, monkeypatch, caplog):
    """The run trains with ML-MMDR (its loss reads batch.poison); Oracle's retrain trains with plain
    cross-entropy on batches that have no poison flags (reading them raises), and every sanitizer
    record set carries threat_model_conflict = 1 with one warning for the run."""
    seen: list[tuple[str, str]] = []  # (regime class, batch class) of every loss evaluation
    base_loss, mmd_loss = Regime.loss, MMDRegime.loss

    def spy(original):
        def loss(self, model, batch):
            seen.append((type(self).__name__, type(batch).__name__))
            return original(self, model, batch)
        return loss

    monkeypatch.setattr(Regime, "loss", spy(base_loss))
    monkeypatch.setattr(MMDRegime, "loss", spy(mmd_loss))
    cfg = tiny_cfg("train=mlmmdr", "defense=[nd,oracle]", "train.epochs=2")
    with caplog.at_level(logging.WARNING):
        out = pipeline.run(cfg, tmp_path)
    n_train, n_poison = out["run"]["n_train"], out["run"]["n_poison"]
    steps = lambda rows: 2 * (rows // 32)  # noqa: E731  (2 epochs, batch 32, drop_last)
    assert seen.count(("MLMMDR", "Batch")) == steps(n_train)  # the attacker's training: the run's model
    assert seen.count(("Regime", "DefenderBatch")) == steps(n_train - n_poison)  # Oracle's retrain
    assert len(seen) == steps(n_train) + steps(n_train - n_poison)  # nothing else trained
    nd, oracle = _by_defense(out, "nd"), _by_defense(out, "oracle")
    assert {r["retrain_regime"] for r in oracle} == {"standard"}
    assert {r["retrain_regime"] for r in nd} == {"run:mlmmdr"}  # ND scores the attacker's own model
    assert _values(nd)["threat_model_conflict"] == 1.0 and _values(oracle)["threat_model_conflict"] == 1.0
    run = {r["metric"]: r["value"] for r in out["metrics"] if "defense" not in r}
    assert _values(nd)["c"] == run["ba"] and _values(nd)["retrain_cache"] == 1.0
    assert sum(CONFLICT in rec.getMessage() for rec in caplog.records) == 1  # once per run


def test_standard_run_has_no_conflict_and_shares_the_defenders_model(tmp_path):
    """With one cache: the Oracle retrain of an ML-MMDR run and of a standard run are the same
    defender training (standard loss, same schedule, same kept rows), so the second loads the
    first's model; the run models themselves (ML-MMDR vs standard) are two different models."""
    common = ("defense=[oracle]", "train.epochs=2", "attack.poison_rate=0.2")
    mmd = pipeline.run(compose_cfg(with_tiny("train=mlmmdr", *common), tmp_path / "cache"), tmp_path / "a")
    std = pipeline.run(compose_cfg(with_tiny("train=standard", *common), tmp_path / "cache"), tmp_path / "b")
    assert std["run"]["model_cache"] == "miss" and std["run"]["model_key"] != mmd["run"]["model_key"]
    assert _values(_by_defense(mmd, "oracle"))["retrain_cache"] == 0.0
    oracle = _values(_by_defense(std, "oracle"))
    assert oracle["retrain_cache"] == 1.0
    assert oracle["c"] == _values(_by_defense(mmd, "oracle"))["c"]
    assert "threat_model_conflict" not in oracle


def test_defender_regime_is_checked_and_named_in_the_error():
    run_train = compose_cfg(with_tiny("train=mlmmdr")).train
    cfg = defender_train_cfg(run_train, "standard", "defense.ispl.retrain_regime")
    # the standard loss with the run's optimiser schedule, none of ML-MMDR's keys
    assert cfg.name == "standard" and "mmd_weight" not in cfg
    assert (cfg.epochs, cfg.batch_size, cfg.lr, list(cfg.milestones)) == (
        run_train.epochs, run_train.batch_size, run_train.lr, list(run_train.milestones))
    for bad, words in [("mlmmdr", "reads the poison flags"), ("slmmdr", "reads the poison flags"),
                       ("sgd", "not a training regime"), (None, "is missing")]:
        with pytest.raises(ConfigError, match="defense.ispl.retrain_regime") as err:
            defender_train_cfg(run_train, bad, "defense.ispl.retrain_regime")
        assert words in str(err.value) and "standard" in str(err.value)
    with pytest.raises(ConfigError, match="defense.oracle.retrain_regime=mlmmdr"):
        pipeline.run(compose_cfg(with_tiny("train.epochs=1", "defense=[oracle]",
                                           "defense.oracle.retrain_regime=mlmmdr")), "unused")


class FlagReader(Regime):
    """A regime that forgot to declare reads_poison_flags."""

    def loss(self, model, batch):
        logits = model(batch.x)
        return torch.nn.functional.cross_entropy(logits[~batch.poison], batch.y[~batch.poison]), logits


def test_defender_batches_carry_no_poison_flags():
    torch.manual_seed(0)
    x = (torch.rand(64, 1, 16, 16) * 255).to(torch.uint8)
    y = torch.randint(0, 4, (64,))
    cfg = compose_cfg(with_tiny("train.epochs=1")).train
    model = build_model(compose_cfg(with_tiny("model.width=0.25")).model, in_channels=1, num_classes=4,
                        image_size=16, mean=[0.5], std=[0.25])
    blind = DefenderLoader(x, y, batch_size=32, device=torch.device("cpu"), seed=0)
    batch = next(iter(blind))
    assert not hasattr(batch, "cross")
    with pytest.raises(PoisonFlagsHidden):
        batch.poison
    with pytest.raises(PoisonFlagsHidden, match="reads_poison_flags"):
        train_model(model, blind, FlagReader(cfg), cfg, torch.device("cpu"))
    # the attacker's loader does carry them: the same regime trains there
    flags = torch.zeros(64, dtype=torch.bool)
    flags[:8] = True
    train_model(model, DeviceLoader(x, y, flags, batch_size=32, device=torch.device("cpu"), seed=0),
                FlagReader(cfg), cfg, torch.device("cpu"))


def test_wanet_noise_mode_is_an_attacker_trained_model(tiny_cfg, tmp_path):
    out = pipeline.run(tiny_cfg("attack=warped", "attack.noise_mode=true", "attack.cross_ratio=1",
                                "defense=[nd]", "train.epochs=1"), tmp_path)
    assert _values(_by_defense(out, "nd"))["threat_model_conflict"] == 1.0

