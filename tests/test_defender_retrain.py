"""A sanitizer retrains with the DEFENDER's regime (training/defender.py; ISPL §3.1, App. D.2.1),
never with the run's regime, which under train=mlmmdr is the attacker's and reads poison flags;
runs whose model the attacker trained mark their sanitizer records (threat_model_conflict)."""
from __future__ import annotations

from types import SimpleNamespace

import logging

import pytest
import torch
from torch.optim.lr_scheduler import MultiStepLR

from bdexp import pipeline
from bdexp.data.loader import DeviceLoader
from bdexp.errors import ConfigError
from bdexp.models import build_model
from bdexp.training.base import Regime
from bdexp.training.defender import DefenderLoader, PoisonFlagsHidden, defender_train_cfg
from bdexp.training.loop import train_model
from bdexp.training.mmdr import MMDRegime
from tests.conftest import compose_cfg, with_tiny
from tests.test_ispl_core import sgd_steps  # noqa: F401  (fixture)

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


def test_epoch_indexed_schedule_matches_per_step_multisteplr(sgd_steps):  # noqa: F811
    """The loop sets the lr per epoch from the absolute epoch; for an ordinary run it is exactly
    the per-step MultiStepLR it replaced (milestones = round(f · epochs) epochs, deduplicated)."""
    torch.manual_seed(0)
    x = (torch.rand(96, 1, 16, 16) * 255).to(torch.uint8)
    y = torch.randint(0, 4, (96,))
    cfg = compose_cfg(with_tiny("train.epochs=5", "train.milestones=[0.4,0.5,0.8]")).train  # epochs 2, 2, 4
    model = build_model(compose_cfg(with_tiny("model.width=0.25")).model, in_channels=1, num_classes=4,
                        image_size=16, mean=[0.5], std=[0.25])
    loader = DeviceLoader(x, y, batch_size=32, device=torch.device("cpu"), seed=0, drop_last=True)
    history = train_model(model, loader, Regime(cfg), cfg, torch.device("cpu"))
    dummy = torch.optim.Adam([torch.zeros(1, requires_grad=True)], lr=cfg.lr)  # not SGD: the spy counts SGD steps
    reference = MultiStepLR(dummy, milestones=[2 * len(loader), 4 * len(loader)], gamma=cfg.gamma)
    want = []
    for _ in range(5 * len(loader)):
        want.append(dummy.param_groups[0]["lr"])
        dummy.step()
        reference.step()
    assert [lr for _, lr in sgd_steps] == pytest.approx(want, rel=1e-12)
    assert history["lr"] == pytest.approx([cfg.lr, cfg.lr, cfg.lr * 0.1, cfg.lr * 0.1, cfg.lr * 0.01])


def test_itlm_rounds_are_fresh_defender_models_with_their_own_step_schedule(sgd_steps):  # noqa: F811
    """ITLM under a train=mlmmdr run: every round a fresh model (ISPL App. C: "a fresh model
    beginning each iteration") trained with plain cross-entropy and the run's step schedule over
    that round's epochs; α from the ε the defender is told (App. C: 96 % at ε = 10 %)."""
    from bdexp.data.synthetic import SyntheticOptions, synthetic
    from bdexp.defenses.contexts import ModelView, SanitizerContext
    from bdexp.defenses.ispl import ITLMOptions, itlm_fraction, itlm_keep
    from bdexp.defenses.ispl_core import TensorTrainer
    from bdexp.defenses.sanitize import defender_training

    cfg = compose_cfg(with_tiny("train=mlmmdr", "train.epochs=4", "defense=[itlm]", "attack.poison_rate=0.1"))
    data = synthetic(SyntheticOptions.parse({"num_classes": 4, "train_size": 64, "test_size": 4, "split_seed": 0}))
    opts = ITLMOptions.parse(cfg.defense.itlm)
    train_cfg = defender_training(SimpleNamespace(cfg=cfg), "itlm", opts)  # the defender's: standard, the run's schedule
    ctx = SanitizerContext(seed=0, x=data.x_train, y=data.y_train, num_classes=4,
                           view=ModelView(torch.nn.Identity(), torch.device("cpu"), 64), model_name="convnet",
                           make_trainer=lambda: TensorTrainer(data.x_train, data.y_train, cfg.model, train_cfg,
                                                              torch.device("cpu")),
                           train_epochs=4, reference_epochs=100.0)
    keep, info = itlm_keep(ctx, opts)
    assert info["keep_fraction"] == pytest.approx(0.96) and int(keep.sum()) == round(0.96 * 64)
    # paper epochs 80, 40, 40 at 4/100 of the length: 3, 2, 2; milestones 0.5, 0.7 of each round:
    # epoch 2 of 3 (round(1.5) = round(2.1) = 2) and epoch 1 of 2
    lr = cfg.train.lr
    first = [lr] * 2 * 2 + [lr * 0.1] * 2  # 64 rows, batch 32: 2 steps per epoch
    later = [lr] * 1 + [lr * 0.1] * 1  # round(0.96 · 64) = 61 rows: 1 step per epoch
    assert [s for _, s in sgd_steps] == pytest.approx(first + later + later, rel=1e-9)
    optimizers = [o for o, _ in sgd_steps]
    assert len({id(o) for o in optimizers}) == 3
    with pytest.raises(ConfigError, match=r"defense\.itlm\.eps=1\.5 is not allowed"):
        ITLMOptions.parse({"keep_fraction": None, "eps": 1.5}, "defense.itlm")
    assert itlm_fraction(ITLMOptions.parse({"keep_fraction": None, "eps": 0.2})) == pytest.approx(0.92)
