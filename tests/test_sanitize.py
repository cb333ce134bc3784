"""The sanitizer protocol: keep-mask -> retrain -> C / A / FP / FN; ISPL's per-class SS / AC."""
import math
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf

import bdexp
from bdexp import pipeline
from bdexp.defenses.class_sanitizers import ac_keep, sanitizer_level, ss_keep, ss_removal_fraction
from bdexp.errors import ConfigError
from tests.conftest import compose_cfg, with_tiny

DEFENSE_CONF = Path(bdexp.__file__).parent / "conf" / "defense"


def _by_defense(out, name):
    return {r["metric"]: r["value"] for r in out["metrics"] if r.get("defense") == name}


def test_oracle_removes_the_backdoor_and_nd_reuses_the_run_model(tiny_cfg, tmp_path):
    out = pipeline.run(tiny_cfg("defense=[nd,oracle]", "train.epochs=6", "attack.mode=one_to_one",
                                "attack.source=1", "attack.poison_rate=0.5", cache=True), tmp_path)
    run = {r["metric"]: r["value"] for r in out["metrics"] if "defense" not in r}
    nd, oracle = _by_defense(out, "nd"), _by_defense(out, "oracle")
    n_poison = out["run"]["n_poison"]
    assert nd["fp"] == 0 and nd["fn"] == n_poison and nd["n_removed"] == 0
    assert nd["retrain_cache"] == 1.0  # keep-all = the run's own model, not retrained
    assert nd["a"] == run["tmr"] and nd["c"] == run["ba"]
    assert oracle["fp"] == 0 and oracle["fn"] == 0 and oracle["n_removed"] == n_poison
    assert run["tmr"] > 0.5 and oracle["a"] < 0.1 and oracle["c"] > 0.9


def _sanitizer_cfg(name: str, **over):
    c = OmegaConf.load(DEFENSE_CONF / f"{name}.yaml")[name]
    for key, value in over.items():
        c[key] = value
    return c


class _PlantedRun:
    """What a class sanitizer sees of a run: training rows (x = row index), given labels, poison
    flags and the model's name; `features` looks the rows up in fixed feature vectors."""

    def __init__(self, feats: torch.Tensor, y: torch.Tensor, poison: torch.Tensor, model: str = "convnet"):
        self.train_set = SimpleNamespace(x=torch.arange(len(y)), y=y, poison=poison)
        self.cfg = OmegaConf.create({"model": {"name": model}})
        self._feats = feats

    def features(self, x, levels):
        return None, {level: self._feats[x] for level in levels}

    def rng(self, tag: str) -> np.random.Generator:
        return np.random.default_rng(len(tag))


def _planted(sizes=(100, 100, 100), planted: int = 10, dim: int = 16, seed: int = 0):
    """Each class a Gaussian blob; the first `planted` rows of class 1 sit 12 σ away along one
    axis (a separable subpopulation, as poison is in the layer SS/AC screen)."""
    g = torch.Generator().manual_seed(seed)
    y = torch.cat([torch.full((n,), c) for c, n in enumerate(sizes)])
    feats = torch.randn(len(y), dim, generator=g)
    far = (y == 1).nonzero().flatten()[:planted]
    feats[far, 0] += 12.0
    flags = torch.zeros(len(y), dtype=torch.bool)
    flags[far] = True
    return feats, y, flags


@pytest.mark.parametrize("eps, fraction", [(0.05, 0.2), (0.1, 0.2), (0.2, 0.3), (0.3, 0.45)])
def test_ss_train_removes_the_documented_fraction_of_every_class(eps, fraction):
    """ISPL App. C: 20 % of each class at ε = 5 and 10 %, 30 % at ε = 20 %; 1.5·ε beyond. Classes
    of 100 / 60 / 140 lose ⌈fraction·n⌉ each, and the planted subpopulation goes first."""
    feats, y, flags = _planted(sizes=(100, 60, 140))
    keep, _ = ss_keep(_PlantedRun(feats, y, flags), _sanitizer_cfg("ss_train", eps=eps))
    assert ss_removal_fraction(_sanitizer_cfg("ss_train", eps=eps)) == pytest.approx(fraction)
    removed = [int((~keep & (y == c)).sum()) for c in range(3)]
    assert removed == [math.ceil(fraction * n - 1e-9) for n in (100, 60, 140)]
    assert not keep[flags].any()


@pytest.mark.parametrize("name", ["ss_train", "ac_train"])
def test_class_sanitizers_never_read_the_poison_flags(name):
    """The keep-mask is the same whatever the flags say (none, all, or the planted rows)."""
    feats, y, flags = _planted()
    keep_fn = ss_keep if name == "ss_train" else ac_keep
    masks = [keep_fn(_PlantedRun(feats, y, f), _sanitizer_cfg(name))[0]
             for f in (flags, torch.zeros_like(flags), torch.ones_like(flags))]
    assert all(torch.equal(masks[0], m) for m in masks[1:])


def test_ac_train_removes_the_smaller_cluster_of_every_class():
    """ART's cluster_analysis="smaller" (ISPL App. C, §5: "discards the smallest cluster"): in the
    class with a separated 10-row subpopulation exactly those rows go; every class loses some rows."""
    feats, y, flags = _planted(sizes=(100, 100, 100))
    keep, _ = ac_keep(_PlantedRun(feats, y, flags), _sanitizer_cfg("ac_train"))
    assert torch.equal(~keep & (y == 1), flags)
    assert all(0 < int((~keep & (y == c)).sum()) <= 50 for c in (0, 2))  # the smaller of 2 clusters of 100


def test_sanitizer_layers_follow_ispl_app_c_and_config_errors():
    ss, ac = _sanitizer_cfg("ss_train"), _sanitizer_cfg("ac_train")
    assert ss.level_by_model == ac.level_by_model  # App. C: AC uses "the same layers as for Spectral Signatures"
    run = _PlantedRun(*_planted(), model="preact18")
    assert sanitizer_level(run, ss) == "s2"  # "the input to the first block of the fourth layer"
    assert sanitizer_level(_PlantedRun(*_planted(), model="resnet32"), ac) == "s3"
    assert sanitizer_level(run, _sanitizer_cfg("ss_train", level="s1")) == "s1"
    with pytest.raises(ConfigError, match="level_by_model"):
        sanitizer_level(_PlantedRun(*_planted(), model="mystery"), ss)
    with pytest.raises(ConfigError, match="defense.ss_train.level"):
        sanitizer_level(run, _sanitizer_cfg("ss_train", level="s7"))
    for bad in (None, 0, 1.0, "0.1"):
        with pytest.raises(ConfigError, match="defense.ss_train.eps"):
            ss_removal_fraction(_sanitizer_cfg("ss_train", eps=bad))
    with pytest.raises(ConfigError, match="removal fraction"):
        ss_removal_fraction(_sanitizer_cfg("ss_train", eps=0.7))


def test_class_sanitizers_in_the_pipeline_record_their_assumptions(tiny_cfg, tmp_path):
    """End to end: SS removes ⌈20 %⌉ of every given-label class at the default assumed ε = 0.1 and
    records that ε; removed rows split exactly into clean removed (fp) and poison removed."""
    out = pipeline.run(tiny_cfg("defense=[ss_train,ac_train]", "train.epochs=2", "attack.poison_rate=0.1",
                                "dataset.train_size=512", cache=True), tmp_path)
    n_poison = out["run"]["n_poison"]
    ss, ac = _by_defense(out, "ss_train"), _by_defense(out, "ac_train")
    _, _, train, _ = pipeline.prepare(compose_cfg(with_tiny("attack.poison_rate=0.1", "dataset.train_size=512")))
    sizes = torch.bincount(train.y).tolist()
    assert ss["n_removed"] == sum(math.ceil(0.2 * n - 1e-9) for n in sizes)
    assert ss["assumed_eps"] == 0.1 and ss["removal_fraction"] == 0.2
    for rows in (ss, ac):
        assert rows["n_removed"] == rows["fp"] + (n_poison - rows["fn"])


def test_intermediate_stages_are_scored_by_the_evaluator(tiny_cfg, tmp_path, monkeypatch):
    """A sanitizer's info["stages"] masks (ISPL: the set after boosting) get fp_<stage>/fn_<stage>
    records computed from the ground truth, which the sanitizer itself never sees."""
    from bdexp.defenses import ispl as ispl_module

    def fake_keep(exp, cfg):  # a known answer: the test may read the flags, a defense may not
        poison = exp.train_set.poison
        final = ~poison
        final[torch.nonzero(~poison).flatten()[:5]] = False  # 5 clean rows removed, every poison removed
        boost = torch.ones_like(poison)
        boost[torch.nonzero(~poison).flatten()[:7]] = False  # 7 clean removed, every poison kept
        return final, {"model_epochs": 0, "stages": {"boost": boost}}

    monkeypatch.setattr(ispl_module, "ispl_keep", fake_keep)
    out = pipeline.run(tiny_cfg("defense=[ispl]", "train.epochs=1"), tmp_path)
    rec = _by_defense(out, "ispl")
    n_poison = out["run"]["n_poison"]
    assert (rec["fp"], rec["fn"]) == (5, 0)
    assert (rec["fp_boost"], rec["fn_boost"]) == (7, n_poison)
