"""The sanitizer protocol: keep-mask -> retrain -> C / A / FP / FN; ISPL's per-class SS / AC."""
import math

import pytest
import torch
from omegaconf import OmegaConf
from torch import nn

from bdexp import pipeline
from bdexp.defenses import DEFENSES
from bdexp.defenses.class_sanitizers import (ACTrainOptions, SSTrainOptions, ac_keep, sanitizer_level, ss_keep,
                                             ss_removal_fraction)
from bdexp.defenses.contexts import ModelView, OracleContext, SanitizerContext
from bdexp.errors import ConfigError
from tests.conftest import CONF_DIR, compose_cfg, with_tiny

DEFENSE_CONF = CONF_DIR / "defense"
OPTIONS = {"ss_train": SSTrainOptions, "ac_train": ACTrainOptions}


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


def _opts(name: str, **over):
    """The sanitizer's options from its YAML (conf/defense/NAME.yaml), overridden, as the run parses them."""
    return OPTIONS[name].parse(_sanitizer_cfg(name, **over), f"defense.{name}")


class _Lookup(nn.Module):
    """A stand-in model whose features (every level) are fixed vectors looked up by row: the
    training "images" are the row indices."""

    def __init__(self, feats: torch.Tensor):
        super().__init__()
        self.register_buffer("feats", feats)

    def forward(self, x, features=False):
        f = self.feats[x.long()]
        return (f, {lv: f for lv in ("s1", "s2", "s3", "penult")}) if features else f


def _no_trainer():
    raise AssertionError("a class sanitizer trains no model of its own")


def _planted_context(feats: torch.Tensor, y: torch.Tensor, poison: torch.Tensor | None = None,
                     model: str = "convnet") -> SanitizerContext:
    """What a class sanitizer sees of a run (contexts.SanitizerContext): training rows (x = row
    index), given labels, the model's features and name. With `poison`: the oracle's context, which
    also holds the flags (a class sanitizer must ignore them)."""
    common = dict(seed=0, x=torch.arange(len(y)), y=y, num_classes=int(y.max()) + 1,
                  view=ModelView(_Lookup(feats), torch.device("cpu"), 256), model_name=model,
                  make_trainer=_no_trainer, train_epochs=100, reference_epochs=100.0)
    return SanitizerContext(**common) if poison is None else OracleContext(**common, poison=poison)


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
    keep, _ = ss_keep(_planted_context(feats, y), _opts("ss_train", eps=eps))
    assert ss_removal_fraction("ss_train", _opts("ss_train", eps=eps)) == pytest.approx(fraction)
    removed = [int((~keep & (y == c)).sum()) for c in range(3)]
    assert removed == [math.ceil(fraction * n - 1e-9) for n in (100, 60, 140)]
    assert not keep[flags].any()


@pytest.mark.parametrize("name", ["ss_train", "ac_train"])
def test_class_sanitizers_never_read_the_poison_flags(name):
    """A SanitizerContext holds no flags at all; handed the oracle's context, which does, the
    keep-mask is the same whatever the flags say (none, all, or the planted rows) and as without them."""
    feats, y, flags = _planted()
    keep_fn = ss_keep if name == "ss_train" else ac_keep
    assert not hasattr(_planted_context(feats, y), "poison")
    masks = [keep_fn(_planted_context(feats, y), _opts(name))[0]]
    masks += [keep_fn(_planted_context(feats, y, f), _opts(name))[0]
              for f in (flags, torch.zeros_like(flags), torch.ones_like(flags))]
    assert all(torch.equal(masks[0], m) for m in masks[1:])


def test_ac_train_removes_the_smaller_cluster_of_every_class():
    """ART's cluster_analysis="smaller" (ISPL App. C, §5: "discards the smallest cluster"): in the
    class with a separated 10-row subpopulation exactly those rows go; every class loses some rows."""
    feats, y, flags = _planted(sizes=(100, 100, 100))
    keep, _ = ac_keep(_planted_context(feats, y), _opts("ac_train"))
    assert torch.equal(~keep & (y == 1), flags)
    assert all(0 < int((~keep & (y == c)).sum()) <= 50 for c in (0, 2))  # the smaller of 2 clusters of 100


def test_sanitizer_layers_follow_ispl_app_c_and_config_errors():
    ss, ac = _opts("ss_train"), _opts("ac_train")
    assert ss.level_by_model == ac.level_by_model  # App. C: AC uses "the same layers as for Spectral Signatures"
    assert _sanitizer_cfg("ss_train").level_by_model == _sanitizer_cfg("ac_train").level_by_model
    feats, y, _ = _planted()
    ctx = _planted_context(feats, y, model="preact18")
    assert sanitizer_level(ctx, "ss_train", ss) == "s2"  # "the input to the first block of the fourth layer"
    assert sanitizer_level(_planted_context(feats, y, model="resnet32"), "ac_train", ac) == "s3"
    assert sanitizer_level(ctx, "ss_train", _opts("ss_train", level="s1")) == "s1"
    with pytest.raises(ConfigError, match=r"defense\.ss_train\.level_by_model, which has no entry for model='mystery'"):
        sanitizer_level(_planted_context(feats, y, model="mystery"), "ss_train", ss)
    # bad values are refused when the options are parsed (at compose time)
    with pytest.raises(ConfigError, match=r"defense\.ss_train\.level='s7' is not allowed: use one of s1, s2, s3, "
                                          r"penult or null"):
        _opts("ss_train", level="s7")
    for bad, shown in ((None, "null"), (0, "0"), (1.0, "1.0"), ("0.1", "'0.1'")):
        with pytest.raises(ConfigError, match=rf"defense\.ss_train\.eps={shown} is not allowed: use a finite number"):
            _opts("ss_train", eps=bad)
    with pytest.raises(ConfigError, match="removal fraction"):
        ss_removal_fraction("ss_train", _opts("ss_train", eps=0.7))


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
    def fake_keep(ctx, opts):  # a known answer: the test may read the flags, a defense may not
        poison = ctx.poison  # handed over as to the oracle (reads_ground_truth below)
        final = ~poison
        final[torch.nonzero(~poison).flatten()[:5]] = False  # 5 clean rows removed, every poison removed
        boost = torch.ones_like(poison)
        boost[torch.nonzero(~poison).flatten()[:7]] = False  # 7 clean removed, every poison kept
        return final, {"model_epochs": 0, "stages": {"boost": boost}}

    # the registry holds the function itself: replace it there, with the oracle's view of the flags
    monkeypatch.setitem(DEFENSES._items, "ispl", fake_keep)
    monkeypatch.setitem(DEFENSES._meta, "ispl", {**DEFENSES.meta("ispl"), "reads_ground_truth": True})
    out = pipeline.run(tiny_cfg("defense=[ispl]", "train.epochs=1"), tmp_path)
    rec = _by_defense(out, "ispl")
    n_poison = out["run"]["n_poison"]
    assert (rec["fp"], rec["fn"]) == (5, 0)
    assert (rec["fp_boost"], rec["fn_boost"]) == (7, n_poison)
