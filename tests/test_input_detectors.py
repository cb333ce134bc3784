"""Input-level detectors (CD; OVL §III-D, Table II): the shared pool protocol, Cognitive Distillation on a
hand-built backdoored model, STRIP / MSP / energy / Mahalanobis against direct formulas, the
overlap detector's per-class scoring, one tiny end-to-end run, the `detect` table and the presets."""
from __future__ import annotations

from collections import Counter
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from omegaconf import OmegaConf
from torch import nn

from bdexp import metrics, pipeline
from bdexp.analysis.overlap import OverlapScorer
from bdexp.defenses import run_defense
from bdexp.defenses.cd import CDOptions, build_cd, cd_l1_norms, distill, frozen, output_fn
from bdexp.defenses.contexts import DetectorContext, ModelView, Reserve
from bdexp.defenses.input_pools import (INFO_KEY, InputDetectorOptions, InputPool, clean_reserve, input_pool,
                                        run_input_detector, stratified_cap)
from bdexp.defenses.ood_scores import (EnergyOptions, MahalanobisOptions, MSPOptions, build_msp, energy_suspicion, fit_mahalanobis,
                                       mahalanobis_min, msp_suspicion)
from bdexp.defenses.overlap_detect import OverlapOptions, build_overlap
from bdexp.defenses.strip import StripOptions, strip_entropy
from bdexp.errors import ConfigError
from bdexp.report.detect import detect_table
from tests.conftest import CONF_DIR, compose_cfg, with_tiny

HYPER = dict(lr=0.1, betas=(0.1, 0.1), alpha=0.01, beta=1.0)  # CD authors' code, logit variant (cd.yaml)
CPU = torch.device("cpu")


def _cd(**kw) -> CDOptions:
    """CD's options: the declared defaults (= conf/defense/cd.yaml), overridden."""
    return CDOptions.parse(kw)


def _context(model: nn.Module, x: torch.Tensor, y: torch.Tensor, num_classes: int, seed: int = 0) -> DetectorContext:
    """An input detector's view of a hand-built model with reserve images (x, y)."""
    return DetectorContext(seed=seed, view=ModelView(model, CPU, 256), reserve=Reserve(x, y, np.arange(len(y))),
                           num_classes=num_classes)


def _exp_context(exp, reserve: Reserve) -> DetectorContext:
    """What the evaluator builds from a run for an input detector (input_pools.run_input_detector)."""
    return DetectorContext(seed=exp.seed, view=ModelView(exp.model, exp.device, int(exp.cfg.eval_batch_size)),
                           reserve=reserve, num_classes=exp.data.num_classes)


class GatedToy(nn.Module):
    """A hand-built backdoored classifier on 3×8×8 images: when the bottom-right pixel is bright
    (the trigger) a sigmoid gate sends the logits to a fixed target vector that depends on nothing
    else; otherwise the logits are a dense linear function of every pixel. CD's mask should keep
    only the trigger pixel on triggered inputs and most of the image on clean ones."""

    def __init__(self, k: int = 4, seed: int = 0):
        super().__init__()
        self.w = nn.Parameter(torch.randn(k, 3 * 8 * 8, generator=torch.Generator().manual_seed(seed)))

    def forward(self, x, features=False):
        gate = torch.sigmoid(20 * (x[:, :, -1, -1].mean(1, keepdim=True) - 0.75))
        dense = x.flatten(1) @ self.w.T
        target = torch.zeros_like(dense)
        target[:, 0] = 10.0
        logits = (1 - gate) * dense + gate * target
        return (logits, {"s3": dense}) if features else logits


def _toy_inputs(n_clean: int, n_trig: int, seed: int = 1):
    x = torch.rand(n_clean + n_trig, 3, 8, 8, generator=torch.Generator().manual_seed(seed))
    x[:, :, -1, -1] = 0.0
    x[n_clean:, :, -1, -1] = 1.0  # the trigger
    return x, np.r_[np.zeros(n_clean, int), np.ones(n_trig, int)]


# ---------------------------------------------------------------- Cognitive Distillation
def test_cd_distils_the_trigger_pixel_and_ranks_triggered_inputs_first():
    model = GatedToy()
    x, labels = _toy_inputs(8, 8)
    colors = torch.rand(100, len(x), 3, generator=torch.Generator().manual_seed(2))
    with frozen(model):
        masks = distill(output_fn(model, "logit", "s3", "logits", 1.0), x, colors, **HYPER, mask_init=1.0, amp=False)[:, 0]
    norms = masks.sum(dim=(1, 2)).numpy()
    trig, clean = masks[labels == 1], masks[labels == 0]
    assert (trig[:, -1, -1] > 0.9).all()  # the trigger pixel is kept ...
    assert (trig.sum(dim=(1, 2)) - trig[:, -1, -1] < 1.0).all()  # ... and less than one pixel's worth besides
    assert (clean.sum(dim=(1, 2)) > 32).all()  # clean logits need more than half the image
    assert metrics.auroc(labels, -norms) == 1.0


class OnePixel(nn.Module):
    """Logits depend on pixel (3, 4) alone (its channel mean), times a fixed vector."""

    def forward(self, x, features=False):
        logits = x[:, :, 3, 4].mean(1, keepdim=True) * torch.tensor([[5.0, -3.0, 1.0, 0.0]])
        return (logits, {"s3": logits}) if features else logits


def test_cd_keeps_the_one_pixel_the_model_looks_at():
    x, _ = _toy_inputs(6, 0, seed=11)
    colors = torch.rand(100, len(x), 3, generator=torch.Generator().manual_seed(12))
    with frozen(OnePixel()):
        masks = distill(output_fn(OnePixel(), "logit", "s3", "logits", 1.0), x, colors, **HYPER, mask_init=1.0, amp=False)[:, 0]
    assert (masks[:, 3, 4] > 0.9).all()  # kept: any other colour there changes the logits
    assert (masks.sum(dim=(1, 2)) - masks[:, 3, 4] < 1.0).all()  # the other 63 px add up to < 1 px


def test_cd_threshold_rule_uses_the_reserve_mean_and_std():
    model = GatedToy()
    x, labels = _toy_inputs(6, 6, seed=3)
    reserve_x, _ = _toy_inputs(10, 0, seed=4)
    ctx = _context(model, reserve_x, torch.zeros(10, dtype=torch.long), 4)
    opts = _cd(steps=60, batch_size=16, threshold_t=0.5)
    out = build_cd(ctx, opts)(x, "pool")
    ref = cd_l1_norms(model, reserve_x, CPU, _cd(steps=60, batch_size=16, **HYPER), seed=0, tag="reserve")
    norms = -out.scores
    np.testing.assert_array_equal(out.flagged, norms < ref.mean() - 0.5 * ref.std(ddof=1))
    assert out.flagged[labels == 1].all() and metrics.auroc(labels, out.scores) == 1.0
    assert out.extra["reserve_l1_mean"] == pytest.approx(ref.mean())


def test_cd_batched_equals_one_at_a_time_and_leaves_the_model_alone():
    model = GatedToy()
    model.train()
    before = model.w.detach().clone()
    x, _ = _toy_inputs(3, 2, seed=5)
    kw = dict(steps=30, **HYPER)
    one = cd_l1_norms(model, x, CPU, _cd(batch_size=1, **kw), seed=7, tag="t")
    np.testing.assert_allclose(cd_l1_norms(model, x, CPU, _cd(batch_size=5, **kw), seed=7, tag="t"), one, rtol=1e-5)
    np.testing.assert_allclose(cd_l1_norms(model, x, CPU, _cd(batch_size=2, **kw), seed=7, tag="t"), one, rtol=1e-5)
    assert torch.equal(model.w, before) and model.w.grad is None
    assert model.w.requires_grad and model.training  # frozen() restores both
    assert not np.allclose(cd_l1_norms(model, x, CPU, _cd(batch_size=5, **kw), seed=8, tag="t"), one)  # δ is seeded


def test_cd_feature_variant_matches_features_not_logits():
    """The toy's s3 is the dense branch, which depends on every pixel even when triggered."""
    model = GatedToy()
    x, _ = _toy_inputs(0, 4, seed=6)
    kw = dict(steps=60, batch_size=4, lr=0.05, betas=(0.1, 0.1), alpha=0.001, beta=10.0)
    logit = cd_l1_norms(model, x, CPU, _cd(variant="logit", **{**kw, "lr": 0.1, "alpha": 0.01, "beta": 1.0}),
                        seed=0, tag="t")
    feature = cd_l1_norms(model, x, CPU, _cd(variant="feature", level="s3", **kw), seed=0, tag="t")
    assert (feature > 10 * logit).all()


class LeakyToy(GatedToy):
    """Like GatedToy, but a triggered input's logits still carry a share of the dense branch
    (as in small real models): the target wins by a wide margin, the other logits move with the
    content. Logit-matching CD must then keep the content; probability-matching CD need not."""

    def forward(self, x, features=False):
        gate = torch.sigmoid(20 * (x[:, :, -1, -1].mean(1, keepdim=True) - 0.75))
        dense = 0.15 * x.flatten(1) @ self.w.T  # clean softmax stays soft
        target = torch.zeros_like(dense)
        target[:, 0] = 20.0
        return (1 - gate) * dense + gate * (target + 0.5 * dense)


def test_cd_probs_output_distils_the_trigger_where_logits_cannot():
    model = LeakyToy()
    x, labels = _toy_inputs(6, 6, seed=9)
    kw = dict(steps=100, batch_size=12, lr=0.1, betas=(0.1, 0.1), beta=1.0)
    logits = cd_l1_norms(model, x, CPU, _cd(output="logits", alpha=0.01, **kw), seed=0, tag="t")
    probs = cd_l1_norms(model, x, CPU, _cd(output="probs", alpha=1e-3, **kw), seed=0, tag="t")
    assert (logits[labels == 1] > 5).all()  # triggered: content kept to match the leaking logits
    assert (probs[labels == 1] < 3).all()  # triggered: little more than the trigger pixel
    assert (probs[labels == 0] > 40).all()  # clean probabilities still need most of the 64 px
    assert metrics.auroc(labels, -probs) == 1.0


# ---------------------------------------------------------------- STRIP, MSP, energy, Mahalanobis
class ConstantLogits(nn.Module):
    def __init__(self, logits):
        super().__init__()
        self.register_buffer("logits", torch.as_tensor(logits, dtype=torch.float32))
        self.seen: list[torch.Tensor] = []

    def forward(self, x):
        self.seen.append(x.clone())
        return self.logits.expand(len(x), -1)


def test_strip_entropy_known_answers_and_blends():
    x = torch.randint(0, 256, (5, 3, 4, 4), dtype=torch.uint8)
    overlays = torch.randint(0, 256, (3, 3, 4, 4), dtype=torch.uint8)
    one_class = ConstantLogits([200.0, 0.0, 0.0, 0.0])
    h = strip_entropy(one_class, x, overlays, CPU, batch_size=6)  # 2 inputs × 3 overlays per forward
    assert h.shape == (5,) and np.all(np.abs(h) < 1e-12)
    uniform = ConstantLogits([1.0, 1.0, 1.0, 1.0])
    np.testing.assert_allclose(strip_entropy(uniform, x, overlays, CPU, 4096), np.log(4), rtol=1e-6)
    seen = torch.cat(one_class.seen).view(5, 3, 3, 4, 4)
    expect = (x.float()[:, None] / 255 + overlays.float()[None] / 255).clamp(0, 1)
    torch.testing.assert_close(seen, expect)


def test_a_partial_config_takes_the_yaml_defaults():
    """A config without `frr` gets conf/defense/strip.yaml's 1 % rule: the declared default
    (StripOptions, which tests/test_options.py keeps equal to the YAML) is that value."""
    from bdexp.defenses.strip import build_strip

    x = torch.randint(0, 256, (6, 3, 4, 4), dtype=torch.uint8)
    ctx = _context(ConstantLogits([1.0, 0.0]), x, torch.zeros(6, dtype=torch.long), 2)
    assert OmegaConf.load(Path(CONF_DIR) / "defense" / "strip.yaml").strip.frr == 0.01
    assert StripOptions.parse({"n_overlay": 3}).frr == 0.01
    assert build_strip(ctx, StripOptions.parse({"n_overlay": 3}))(x, "pool").flagged is not None
    assert build_strip(ctx, StripOptions.parse({"n_overlay": 3, "frr": None}))(x, "pool").flagged is None


def test_msp_and_energy_match_numpy_formulas():
    logits = np.random.default_rng(0).normal(scale=3.0, size=(50, 7))
    t = torch.as_tensor(logits)
    soft = np.exp(logits - logits.max(1, keepdims=True))
    soft /= soft.sum(1, keepdims=True)
    np.testing.assert_allclose(msp_suspicion(t), -soft.max(1))
    np.testing.assert_allclose(msp_suspicion(t, sign=-1.0), soft.max(1))
    for temp in (1.0, 2.5):
        energy = -temp * np.log(np.exp(logits / temp).sum(1))  # Liu et al. eq. (7)
        np.testing.assert_allclose(energy_suspicion(t, temp), energy)
        np.testing.assert_allclose(energy_suspicion(t, temp, sign=-1.0), -energy)
    # the default direction calls low confidence suspicious: a flat input outranks a confident one
    pair = torch.tensor([[10.0, 0.0, 0.0], [1.0, 1.0, 1.0]])
    assert msp_suspicion(pair)[1] > msp_suspicion(pair)[0] and energy_suspicion(pair, 1.0)[1] > energy_suspicion(pair, 1.0)[0]


@pytest.mark.parametrize("d", [5, 40])  # full rank, and singular (10 per class < d): pseudo-inverse
def test_mahalanobis_matches_a_direct_formula(d):
    rng = np.random.default_rng(d)
    y = np.repeat(np.arange(3), 10)
    feats = rng.normal(size=(30, d)) + 3 * rng.normal(size=(3, d))[y]
    x = rng.normal(size=(20, d)) * 2
    means = np.stack([feats[y == c].mean(0) for c in range(3)])
    centred = feats - means[y]
    prec = np.linalg.pinv(centred.T @ centred / len(feats))
    direct = np.array([min((v - m) @ prec @ (v - m) for m in means) for v in x])
    mu, p = fit_mahalanobis(feats, y, "empirical")
    np.testing.assert_allclose(mahalanobis_min(x, mu, p), direct, rtol=1e-6, atol=1e-8)
    # an unknown estimator is refused when the options are parsed (fit_mahalanobis itself no longer checks)
    with pytest.raises(ConfigError, match=r"defense\.mahalanobis\.covariance='graphical_lasso' is not allowed: "
                                          r"use one of empirical, ledoit_wolf"):
        MahalanobisOptions.parse({"covariance": "graphical_lasso"}, "defense.mahalanobis")


# ---------------------------------------------------------------- pools
def test_stratified_cap_keeps_the_poison_share():
    labels = np.r_[np.zeros(90, int), np.ones(10, int)]
    rows = stratified_cap(labels, 40, np.random.default_rng(0))
    assert len(rows) == 40 == len(set(rows.tolist())) and labels[rows].sum() == 4
    assert np.any(np.diff(labels[rows]) != 0)  # shuffled, not in blocks
    assert sorted(stratified_cap(labels, None, np.random.default_rng(0))) == list(range(100))
    rare = np.r_[np.zeros(999, int), 1]
    assert rare[stratified_cap(rare, 10, np.random.default_rng(0))].sum() == 1  # never drops a class


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """One tiny backdoored run with every input detector (CD and STRIP kept cheap)."""
    mp = pytest.MonkeyPatch()
    seen: dict = {}
    real_ext = pipeline.run_extensions

    def capture(exp):
        seen["exp"] = exp
        return real_ext(exp)

    mp.setattr(pipeline, "run_extensions", capture)
    cfg = compose_cfg(with_tiny("defense=[cd,cd_feature,strip,msp,energy,mahalanobis,overlap]", "train.epochs=4",
                                "defense.cd.steps=3", "defense.cd_feature.steps=3", "defense.strip.n_overlay=5"))
    try:
        out = pipeline.run(cfg, tmp_path_factory.mktemp("run"))
    finally:
        mp.undo()
    return out, seen["exp"]


def test_pools_exclude_the_reserve_and_label_poison(tiny_run):
    _, exp = tiny_run
    reserve = set(exp.reserve_index.tolist())
    train = input_pool(exp, "train", 2000)
    assert input_pool(exp, "train", 2000) is train is exp.info[INFO_KEY][("train", 2000)]  # shared by detectors
    assert sorted(train.index.tolist()) == list(range(len(exp.train_set.y)))
    np.testing.assert_array_equal(train.labels, exp.train_set.poison.numpy()[train.index])
    assert torch.equal(train.x, exp.train_set.x[torch.as_tensor(train.index)])
    assert 0 < train.labels.sum() < len(train.labels)

    test = input_pool(exp, "test", 2000)
    clean, trig = test.index[test.labels == 0], test.index[test.labels == 1]
    bd = exp.backdoor_test
    assert sorted(clean.tolist()) == exp.screen_index.tolist() and not reserve & set(clean.tolist())
    kept = [i for i in range(len(bd.y_target)) if int(bd.index[i]) not in reserve]
    assert sorted(trig.tolist()) == kept and len(kept) < len(bd.y_target)  # some triggered copies were dropped
    assert (bd.y_true[torch.as_tensor(trig)] != exp.target).all()  # non-target images only
    assert torch.equal(test.x[torch.as_tensor(test.labels == 0)], exp.data.x_test[torch.as_tensor(clean)])
    assert torch.equal(test.x[torch.as_tensor(test.labels == 1)], bd.x[torch.as_tensor(trig)])

    capped = input_pool(exp, "test", 20)
    assert len(capped.x) == 20 and capped.labels.sum() == round(20 * test.labels.mean())
    assert capped.n_available == len(test.labels) and capped.n_poison_available == test.labels.sum()

    small, large = clean_reserve(exp, 2), clean_reserve(exp, 3)
    assert set(small.index.tolist()) <= set(large.index.tolist()) <= reserve
    assert Counter(small.y.tolist()) == {c: 2 for c in range(exp.data.num_classes)}
    assert torch.equal(small.y, exp.data.y_test[torch.as_tensor(small.index)])


def test_every_detector_records_both_pools(tiny_run):
    out, exp = tiny_run
    rows = [r for r in out["metrics"] if "pool" in r]
    for defense in ("cd", "cd_feature", "strip", "msp", "energy", "mahalanobis", "overlap"):
        for pool in ("train", "test"):
            got = {r["metric"]: r["value"] for r in rows if (r["defense"], r["pool"]) == (defense, pool)}
            expect = {"auroc", "aupr", "tpr95", "n", "n_poison", "wall_s", "s_per_1k"}
            expect |= {"tpr", "fpr", "precision", "f1"} if defense in ("cd", "cd_feature", "strip") else set()
            assert expect <= set(got), (defense, pool, expect - set(got))
            p = input_pool(exp, pool, 2000)
            assert (got["n"], got["n_poison"]) == (len(p.labels), p.labels.sum())
            assert all(np.isfinite(got[m]) for m in ("auroc", "aupr", "tpr95"))  # known values: the planted tests
            assert got["s_per_1k"] == pytest.approx(1000 * got["wall_s"] / got["n"])
    tagged = {(r["defense"], r.get("variant"), r.get("level")) for r in rows}
    assert ("cd", "logit", None) in tagged and ("cd_feature", "feature", "s3") in tagged
    assert ("overlap", None, "penult") in tagged and ("mahalanobis", None, "penult") in tagged


def test_overlap_scores_each_input_against_its_predicted_class(tiny_run):
    _, exp = tiny_run
    reserve = clean_reserve(exp, 10)
    cfg = {"name": "overlap", "level": "penult", "norm": 2, "num_radii": 10, "center": "p"}
    pool = input_pool(exp, "test", 2000)
    ctx = _exp_context(exp, reserve)
    out = build_overlap(ctx, OverlapOptions.parse(cfg))(pool.x, "test")
    logits, f = exp.features(pool.x, ("penult",))
    rf = exp.features(reserve.x, ("penult",))[1]["penult"]
    for i in range(0, len(pool.x), 7):
        c = int(logits[i].argmax())
        direct = OverlapScorer(norm=2, num_radii=10, center="p").fit(rf[reserve.y == c]).score(f["penult"][i:i + 1])
        assert out.scores[i] == pytest.approx(-float(direct[0]))
    with pytest.raises(ConfigError, match="norm"):  # a number, so it parses; the scorer refuses it
        build_overlap(ctx, OverlapOptions.parse({**cfg, "norm": 3}))
    with pytest.raises(ConfigError, match=r"defense\.overlap\.norm='l2' is not allowed"):
        OverlapOptions.parse({**cfg, "norm": "l2"}, "defense.overlap")


def test_bad_config_and_clean_pools(tiny_run):
    _, exp = tiny_run
    from bdexp.validation import validate_config

    # bad options are refused when parsed, before any detector is built
    with pytest.raises(ConfigError, match=r"defense\.cd\.variant='pixels' is not allowed: use one of logit, feature"):
        CDOptions.parse({"name": "cd", "variant": "pixels"}, "defense.cd")
    with pytest.raises(ConfigError, match=r"defense\.msp: unknown key\(s\) stpes; allowed: "):
        MSPOptions.parse({"name": "msp", "stpes": 3}, "defense.msp")
    with pytest.raises(ConfigError, match=r"defense\.energy\.pools=\['val'\] is not allowed"):
        EnergyOptions.parse({"name": "energy", "pools": ["val"]}, "defense.energy")
    with pytest.raises(ConfigError, match=r"defense\.energy\.suspicious='sometimes' is not allowed"):
        EnergyOptions.parse({"name": "energy", "suspicious": "sometimes"}, "defense.energy")
    # ... and already when the config is composed
    with pytest.raises(ConfigError, match=r"defense\.cd\.steps=0 is not allowed: use an integer >= 1"):
        validate_config(compose_cfg(with_tiny("defense=[cd]", "defense.cd.steps=0")))
    # run_defense parses too: the evaluator is never reached
    with pytest.raises(ConfigError, match=r"defense\.cd\.variant='pixels'"):
        run_defense(exp, "cd", OmegaConf.create({"name": "cd", "variant": "pixels"}))
    with pytest.raises(ConfigError, match=r"defense\.x\.pools=\[\] is not allowed: use a non-empty list"):
        InputDetectorOptions.parse({"pools": []}, "defense.x")
    # a pool without poisoned inputs (attack `none`) is skipped, and nothing is built
    p = input_pool(exp, "train", 2000)
    exp.info[INFO_KEY][("train", 7)] = InputPool("train", p.x, np.zeros_like(p.labels), p.index, len(p.labels), 0)

    def never(*_):
        raise AssertionError("a detector was built for a pool with nothing to find")

    rows = run_input_detector(exp, "x", InputDetectorOptions.parse({"pools": ["train"], "max_pool": 7}), never, {})
    assert rows == [{"metric": "skipped", "value": 1.0, "pool": "train"}]


# ---------------------------------------------------------------- report and presets
def test_detect_table_layout_and_seed_mean():
    run = dict(dataset="d", model="m", attack="patched", attack_mode="all_to_one", train="standard", regime="standard")
    recs = []
    for seed, v in ((0, 0.2), (1, 0.4)):
        for defense in ("msp", "overlap"):
            for pool in ("train", "test"):
                for metric in ("auroc", "aupr", "tpr95", "n"):
                    recs.append(dict(run, seed=seed, defense=defense, pool=pool, metric=metric,
                                     value=v + (defense == "overlap")))
    recs.append(dict(run, seed=0, metric="ba", value=0.9))  # a model-level record: not in the table
    table = detect_table(pd.DataFrame(recs))
    assert list(table.columns) == ["overlap", "msp"]  # OVL Table II order
    assert list(table.index.names) == ["pool", "metric"]
    assert list(table.loc["test"].index) == ["tpr95", "auroc", "aupr"]
    assert table.loc[("train", "auroc"), "msp"] == pytest.approx(0.3)
    assert table.loc[("train", "auroc"), "overlap"] == pytest.approx(1.3)


def test_presets_compose():
    ovl = compose_cfg(["experiment=ovl_backdoor"])
    assert set(ovl.defense) == {"overlap", "strip", "mahalanobis", "msp", "energy", "cd", "cd_probs"}
    assert ovl.defense.cd_probs.output == "probs" and ovl.defense.cd_probs.alpha == 1e-4
    cd = compose_cfg(["experiment=cd_detect"])
    assert (cd.defense.cd.variant, cd.defense.cd_feature.variant) == ("logit", "feature")
    assert cd.defense.cd_feature.name == "cd" and cd.defense.cd_feature.alpha == 0.001  # CD authors' code, feature α (cd_feature.yaml)
    sweeps = {name: OmegaConf.load(Path(CONF_DIR) / "experiment" / f"{name}.yaml").hydra.sweeper.params
              for name in ("ovl_backdoor", "cd_detect")}
    assert sweeps["ovl_backdoor"]["attack"] == "patched,blended,warped"
    assert sweeps["ovl_backdoor"]["attack.mode"] == "all_to_one,all_to_all"
    assert sweeps["cd_detect"]["attack"] == "patched,blended,sig,warped"


def test_matrix_preset_composes_every_detector():
    m = compose_cfg(["experiment=matrix", "scale=cpu"])
    assert set(m.defense) == {"ac", "ss", "sr", "cd", "cd_probs", "overlap", "strip", "mahalanobis", "ispl"}
    assert list(m.defense.cd.pools) == ["test"] and m.defense.overlap.max_pool == 1000
    params = OmegaConf.load(Path(CONF_DIR) / "experiment" / "matrix.yaml").hydra.sweeper.params
    assert params["attack"] == "patched,blended,sig,warped,dlbd" and params["train"] == "standard,mlmmdr"


def test_cd_probs_output_is_the_tempered_softmax():
    model = ConstantLogits([2.0, 0.0, -2.0])
    f = output_fn(model, "logit", "s3", "probs", 2.0)
    np.testing.assert_allclose(f(torch.zeros(1, 1, 2, 2)).numpy(), torch.softmax(torch.tensor([[1.0, 0.0, -1.0]]), 1).numpy(),
                               rtol=1e-6)
    assert torch.equal(output_fn(model, "logit", "s3", "logits", 1.0)(torch.zeros(1, 1, 2, 2)), model.logits.expand(1, -1))


# ---------------------------------------------------------------- every detector on a planted backdoor
class PlantedGate(nn.Module):
    """A hand-built backdoored classifier on 1×8×8 images with 3 classes, target 0. Class c's
    evidence is the mean of rows 2c..2c+1 (features = those three means and the trigger pixel
    (7, 7)); when the trigger pixel is bright a sigmoid gate replaces the logits by (30, 0, 0).
    Clean images keep the trigger pixel below 40/255, so their gate is < 1e-3 (also in STRIP's
    blends, where it stays below 80/255)."""

    def forward(self, x, features=False):
        rows = torch.stack([x[:, 0, 2 * c:2 * c + 2].mean(dim=(1, 2)) for c in range(3)], 1)
        trig = x[:, 0, -1, -1]
        f = torch.cat([rows, trig[:, None]], 1)
        gate = torch.sigmoid(40 * (trig - 0.5))[:, None]
        target = torch.tensor([30.0, 0.0, 0.0], device=x.device).expand_as(rows)
        logits = (1 - gate) * 10 * rows + gate * target
        return (logits, {lv: f for lv in ("s1", "s2", "s3", "penult")}) if features else logits


def _planted_images(y: np.ndarray, g: np.random.Generator, triggered: bool = False) -> torch.Tensor:
    x = g.uniform(0, 0.3, (len(y), 1, 8, 8))
    for i, c in enumerate(y):
        x[i, 0, 2 * c:2 * c + 2] = g.uniform(0.7, 1.0, (2, 8))
    x[:, 0, -1, -1] = 1.0 if triggered else g.uniform(0, 40 / 255, len(y))
    return torch.as_tensor(np.round(x * 255).astype(np.uint8))


@pytest.fixture(scope="module")
def planted_exp():
    """A real `Experiment` around PlantedGate: 60 clean test images per class (10 per class
    reserved), the triggered copies of the 120 non-target ones, and a training set of 90 clean
    + 20 poisoned images (label 0)."""
    from bdexp.attacks.base import BackdoorTestSet, PoisonedTrainSet
    from bdexp.data.base import ImageDataset
    from bdexp.experiment import Experiment

    g = np.random.default_rng(0)
    y_test = np.repeat(np.arange(3), 60)
    x_test = _planted_images(y_test, g)
    non_target = np.flatnonzero(y_test != 0)
    bd = BackdoorTestSet(_planted_images(y_test[non_target], g, triggered=True), torch.zeros(len(non_target), dtype=torch.long),
                         torch.as_tensor(y_test[non_target]), torch.as_tensor(non_target))
    y_clean, y_src = np.repeat(np.arange(3), 30), np.r_[np.ones(10, int), np.full(10, 2)]
    x_train = torch.cat([_planted_images(y_clean, g), _planted_images(y_src, g, triggered=True)])
    poison = torch.cat([torch.zeros(90, dtype=torch.bool), torch.ones(20, dtype=torch.bool)])
    y_given = torch.as_tensor(np.r_[y_clean, np.zeros(20, int)])
    train = PoisonedTrainSet(x_train, y_given, torch.as_tensor(np.r_[y_clean, y_src]), poison, torch.zeros_like(poison))
    data = ImageDataset("planted", x_train, y_given, x_test, torch.as_tensor(y_test), ["0", "1", "2"])
    cfg = OmegaConf.create({"seed": 0, "eval_batch_size": 64, "screening": {"reserve_per_class": 10}})
    return Experiment(cfg, CPU, data, None, train, bd, PlantedGate(), None)


def _detector_cfg(name: str, **overrides):
    """The detector's own YAML (conf/defense/NAME.yaml), overridden."""
    cfg = OmegaConf.load(Path(CONF_DIR) / "defense" / f"{name}.yaml")[name]
    for k, v in overrides.items():
        cfg[k] = v
    return cfg


# (detector, overrides, AUROC on both pools): the answers follow from PlantedGate's construction.
PLANTED = [
    ("strip", {}, 1.0),  # a triggered blend keeps the gate open: entropy ≈ 0 < every clean input's
    ("mahalanobis", {}, 1.0),  # the trigger coordinate is 1.0, never above 40/255 in the reserve
    ("overlap", {}, 1.0),  # triggered features sit far from the target class's clean features
    ("cd", {"steps": 60}, 1.0),  # a triggered input distils to the trigger pixel
    # low_confidence (the OOD convention, ood_scores.py): the over-confident triggers rank LAST
    ("msp", {}, 0.0),
    ("energy", {}, 0.0),
    ("msp", {"suspicious": "high_confidence"}, 1.0),
    ("energy", {"suspicious": "high_confidence"}, 1.0),
]


@pytest.mark.parametrize("name,overrides,auroc", PLANTED, ids=[f"{n}-{o.get('suspicious', '')}" for n, o, _ in PLANTED])
def test_detectors_on_a_planted_backdoor(planted_exp, name, overrides, auroc):
    exp = planted_exp
    with torch.no_grad():  # the planted model does what it says
        assert bool((exp.features(exp.data.x_test, ())[0].argmax(1) == exp.data.y_test).all())
        assert bool((exp.features(exp.backdoor_test.x, ())[0].argmax(1) == 0).all())
    rows = run_defense(exp, name, _detector_cfg(name, **overrides))
    got = {(r["pool"], r["metric"]): r["value"] for r in rows if "pool" in r}
    # test pool: 150 clean images outside the reserve + the 100 triggered copies of non-reserve images
    assert (got[("test", "n")], got[("test", "n_poison")]) == (250, 100)
    assert (got[("train", "n")], got[("train", "n_poison")]) == (110, 20)
    for pool in ("train", "test"):
        n_pos, n_neg = got[(pool, "n_poison")], got[(pool, "n")] - got[(pool, "n_poison")]
        assert got[(pool, "auroc")] == auroc, (pool, got[(pool, "auroc")])
        # AUPR (average precision): 1 when every poisoned input ranks first. Ranked last, they also
        # tie (in float32 sigmoid(20) == 1, so every triggered input has the logits (30, 0, 0)
        # exactly): one threshold takes them all, at precision n_pos / n.
        assert got[(pool, "aupr")] == pytest.approx(1.0 if auroc == 1.0 else n_pos / (n_pos + n_neg), rel=1e-12)
        assert got[(pool, "tpr95")] == (1.0 if auroc == 1.0 else 0.0)
        if name in ("strip", "cd"):  # their own threshold rules catch every triggered input
            assert got[(pool, "tpr")] == 1.0


def test_skipped_pools_are_one_warning(tmp_path, caplog):
    """attack=none: both pools of an input detector have no poisoned input; one warning says so."""
    from bdexp import pipeline
    from tests.conftest import compose_cfg, with_tiny

    cfg = compose_cfg(with_tiny("attack=none", "defense=[msp]", "train.epochs=1"))
    with caplog.at_level("WARNING"):
        out = pipeline.run(cfg, tmp_path)
    warned = [r.getMessage() for r in caplog.records if "msp: skipped" in r.getMessage()]
    # the test pool: 96 test images less the clean reserve (half of each of the 4 classes: 48)
    assert warned == ["msp: skipped 2 pool(s): train (0 poisoned of 256 inputs), test (0 poisoned of 48 inputs)"]
    assert sum(r["metric"] == "skipped" for r in out["metrics"] if r.get("defense") == "msp") == 2
