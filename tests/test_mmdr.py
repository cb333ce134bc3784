"""ML-MMDR / SL-MMDR regimes (ML-MMDR Algorithm 1): the loss by hand, empty groups, config errors."""
from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch
from omegaconf import OmegaConf

from bdexp import pipeline
from bdexp.analysis.kernels import mmd2
from bdexp.attacks import build_attack
from bdexp.cache import ModelCache
from bdexp.data.loader import Batch
from bdexp.errors import ConfigError
from bdexp.models import build_model
from bdexp.training import REGIMES

ATTACK = SimpleNamespace(name="patched", poisons=True, mode="all_to_one", target=0)


def _regime(name="mlmmdr", attack=ATTACK, **cfg):
    return REGIMES.get(name)(OmegaConf.create({"name": name, **cfg}), attack=attack)


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    net = build_model(OmegaConf.create({"name": "convnet", "width": 0.25}), in_channels=3, num_classes=4,
                      image_size=16, mean=[0.5] * 3, std=[0.25] * 3)
    return net.eval()  # eval: BatchNorm uses running stats, so repeated forwards agree exactly


def _batch(poison, y, seed=0):
    g = torch.Generator().manual_seed(seed)
    n = len(y)
    return Batch(x=torch.rand(n, 3, 16, 16, generator=g), y=torch.as_tensor(y), poison=torch.as_tensor(poison),
                 cross=torch.zeros(n, dtype=torch.bool), index=torch.arange(n))


# 4 benign non-target, 3 benign target (X3), 3 malicious relabelled to target 0 (X2)
BATCH = dict(poison=[False] * 7 + [True] * 3, y=[1, 2, 3, 1, 0, 0, 0, 0, 0, 0])


def test_lambda_zero_is_ce_of_benign_plus_ce_of_malicious(model):
    b = _batch(**BATCH)
    loss, logits = _regime(mmd_weight=0.0).loss(model, b)
    ce = torch.nn.functional.cross_entropy
    want = ce(logits[~b.poison], b.y[~b.poison]) + ce(logits[b.poison], b.y[b.poison])
    assert torch.allclose(loss, want, atol=1e-6)
    assert not torch.allclose(loss, ce(logits, b.y))  # not the plain batch mean


@pytest.mark.parametrize("name,levels", [("mlmmdr", ["s1", "s2", "s3"]), ("slmmdr", ["s3"])])
def test_lambda_adds_mean_mmd_over_levels(model, name, levels):
    b = _batch(**BATCH)
    base, _ = _regime(name, mmd_weight=0.0).loss(model, b)
    loss, _ = _regime(name, mmd_weight=0.2, kernel="gmk_adaptive").loss(model, b)
    with torch.no_grad():
        _, feats = model(b.x, features=True)
    x3 = ~b.poison & (b.y == 0)
    term = sum(mmd2(feats[lv][b.poison], feats[lv][x3], "gmk_adaptive") for lv in levels) / len(levels)
    assert float(term) > 0
    assert float((loss - base).detach()) == pytest.approx(0.2 * float(term), rel=1e-4)
    assert _regime(name).levels == tuple(levels)  # the default levels of each regime


def test_lk_kernel_and_explicit_levels(model):
    b = _batch(**BATCH)
    base, _ = _regime(mmd_weight=0.0).loss(model, b)
    loss, _ = _regime(mmd_weight=0.1, kernel="lk", levels=["s2", "penult"]).loss(model, b)
    with torch.no_grad():
        _, feats = model(b.x, features=True)
    x3 = ~b.poison & (b.y == 0)
    term = sum(mmd2(feats[lv][b.poison], feats[lv][x3], "lk") for lv in ("s2", "penult")) / 2
    assert float((loss - base).detach()) == pytest.approx(0.1 * float(term), rel=1e-4)


@pytest.mark.parametrize("poison,y", [
    ([False] * 6, [0, 1, 2, 3, 0, 1]),  # no malicious rows: X2 empty
    ([True] * 6, [0] * 6),  # only malicious rows: X1 and X3 empty
    ([False] * 5 + [True], [0, 0, 1, 2, 3, 0]),  # one malicious row: too few for an MMD term
    ([False] * 4 + [True] * 2, [1, 2, 3, 1, 0, 0]),  # no benign target row: X3 empty
])
def test_empty_groups_give_a_finite_loss_without_mmd(model, poison, y):
    b = _batch(poison, y)
    base, _ = _regime(mmd_weight=0.0).loss(model, b)
    train_model = build_model(OmegaConf.create({"name": "convnet", "width": 0.25}), in_channels=3, num_classes=4,
                              image_size=16, mean=[0.5] * 3, std=[0.25] * 3)
    train_model.load_state_dict(model.state_dict())
    train_model.eval()
    loss, _ = _regime(mmd_weight=0.3).loss(train_model, b)
    assert math.isfinite(loss.item()) and loss.item() == pytest.approx(base.item(), rel=1e-6)
    loss.backward()
    assert all(torch.isfinite(p.grad).all() for p in train_model.parameters() if p.grad is not None)


def test_gradients_are_finite(model):
    net = build_model(OmegaConf.create({"name": "convnet", "width": 0.25}), in_channels=3, num_classes=4,
                      image_size=16, mean=[0.5] * 3, std=[0.25] * 3)
    loss, _ = _regime(mmd_weight=0.3).loss(net.train(), _batch(**BATCH))
    loss.backward()
    grads = [p.grad for p in net.parameters() if p.grad is not None]
    assert grads and all(torch.isfinite(g).all() for g in grads)


def test_config_errors():
    none = build_attack(OmegaConf.create({"name": "none"}), num_classes=4, image_shape=(3, 16, 16), seed=0)
    with pytest.raises(ConfigError, match="attack=none"):
        _regime(attack=none)
    with pytest.raises(ConfigError, match="attack"):
        _regime(attack=None)
    with pytest.raises(ConfigError, match="all_to_one"):
        _regime(attack=SimpleNamespace(**{**vars(ATTACK), "mode": "all_to_all"}))
    _regime(attack=SimpleNamespace(**{**vars(ATTACK), "mode": "one_to_one"}))  # one target: fine
    with pytest.raises(ConfigError, match="s4"):
        _regime(levels=["s1", "s4"])
    with pytest.raises(ConfigError, match="kernel"):
        _regime(kernel="rbf")
    with pytest.raises(ConfigError, match="mmd_weight"):
        _regime(mmd_weight=-0.1)


def test_yaml_defaults(tiny_cfg):
    for name, levels in (("mlmmdr", ["s1", "s2", "s3"]), ("slmmdr", ["s3"])):
        cfg = tiny_cfg(f"train={name}").train
        assert cfg.name == name and list(cfg.levels) == levels
        assert cfg.mmd_weight == 0.3 and cfg.kernel == "gmk_adaptive"
    standard = tiny_cfg().train
    assert set(standard) <= set(tiny_cfg("train=mlmmdr").train)
    with pytest.raises(ConfigError, match="attack=none"):
        pipeline.run(tiny_cfg("train=mlmmdr", "attack=none"), "/nonexistent-never-written")


def test_tiny_pipeline_run_with_mlmmdr(tiny_cfg, tmp_path):
    cfg = tiny_cfg("train=mlmmdr", "train.epochs=2")
    data, attack, train, _ = pipeline.prepare(cfg)
    _, info = pipeline.fit(cfg, data, attack, train, torch.device("cpu"), ModelCache(tmp_path, enabled=False))
    assert all(math.isfinite(v) for v in info["history"]["loss"])
    out = pipeline.run(cfg, tmp_path / "run")
    assert out["run"]["train"] == "mlmmdr"
    assert {r["metric"] for r in out["metrics"]} >= {"ba", "asr"}


def test_rbt_models_share_one_cache_entry():
    """λ = 0 ML- and SL-MMDR are the same loss; a λ > 0 model is keyed by its levels."""
    from bdexp.cache import model_key
    from bdexp.training import REGIMES
    from tests.conftest import compose_cfg

    def key(*over):
        cfg = compose_cfg(list(over))
        return model_key(cfg, train_cfg=REGIMES.get(cfg.train.name).cache_identity(cfg.train))

    assert key("train=mlmmdr", "train.mmd_weight=0") == key("train=slmmdr", "train.mmd_weight=0")
    assert key("train=mlmmdr", "train.mmd_weight=0.3") != key("train=slmmdr", "train.mmd_weight=0.3")
    assert key("train=mlmmdr", "train.mmd_weight=0") != key("train=standard")


@pytest.mark.parametrize("weight", [0.0, 0.3])
def test_epoch_stats_count_the_rows_the_mmd_term_sees(model, weight):
    """Per batch on average: |X2| (malicious), |X3| (benign target-class), the fraction of batches
    with both >= 2 rows, and the term's mean (0 at λ = 0, where only the counts are kept)."""
    regime = _regime(mmd_weight=weight)
    regime.begin_epoch()
    regime.loss(model, _batch(**BATCH))  # 3 malicious, 3 benign target
    regime.loss(model, _batch(poison=[False] * 9 + [True], y=[1, 2, 3, 1, 0, 0, 2, 3, 1, 0]))  # 1 and 2
    stats = regime.epoch_stats()
    assert stats["mmd_malicious_per_batch"] == pytest.approx(2.0)
    assert stats["mmd_target_per_batch"] == pytest.approx(2.5)
    assert stats["mmd_active_batches"] == pytest.approx(0.5)  # the second batch has one malicious row
    b = _batch(**BATCH)
    with torch.no_grad():
        _, feats = model(b.x, features=True)
    want = _regime(mmd_weight=1.0).mmd_term(feats, b.poison, ~b.poison & (b.y == 0)).item() / 2 if weight else 0.0
    assert stats["mmd_term"] == pytest.approx(want, rel=1e-5, abs=1e-9)
    regime.begin_epoch()
    assert regime.epoch_stats() == {}  # reset: nothing seen in the new epoch yet


def test_training_history_in_the_results_holds_the_mmd_batch_counts(tiny_cfg, tmp_path):
    cfg = tiny_cfg("train=mlmmdr", "train.epochs=2")
    out = pipeline.run(cfg, tmp_path / "run")
    history = out["run"]["train_history"]
    assert len(history["loss"]) == 2 and len(history["mmd_malicious_per_batch"]) == 2
    # ε = 10 % of the batch is malicious on average (the attack poisons round(ε·N) rows)
    batch = int(cfg.train.batch_size)
    assert 0.0 < history["mmd_malicious_per_batch"][0] < batch
    assert all(0.0 <= a <= 1.0 for a in history["mmd_active_batches"])
