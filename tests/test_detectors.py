"""Pool detectors AC, SS, SR (ML-MMDR §3.3, §6.1) on synthetic features with known answers, and the shared
screening protocol (ML-MMDR §6.1) on a real tiny run."""
from __future__ import annotations

import inspect
from collections import Counter

import numpy as np
import pytest
import torch

from bdexp import metrics, pipeline
from bdexp.defenses.ac import ACOptions, detect_ac
from bdexp.defenses.screening import (DetectorOutput, SkipPool, pool_counts, run_pool_detector, score_pool,
                                      screening_pools)
from bdexp.defenses.sr import SROptions, detect_sr, energy_rank, fit_subspace
from bdexp.defenses.ss import SSOptions, detect_ss, n_removed
from bdexp.errors import ConfigError
from bdexp.experiment import Experiment
from tests.conftest import compose_cfg, with_tiny

AC_CFG = {"name": "ac", "n_components": 20, "criterion": "size", "silhouette_threshold": 0.15, "n_init": 10}


def _planted(n_benign: int, n_mal: int, d: int, shift: float, seed: int = 0):
    """Benign N(0, I); malicious the same shifted by `shift` along one random unit direction."""
    rng = np.random.default_rng(seed)
    u = rng.normal(size=d)
    u /= np.linalg.norm(u)
    x = rng.normal(size=(n_benign + n_mal, d))
    x[n_benign:] += shift * u
    labels = np.r_[np.zeros(n_benign, int), np.ones(n_mal, int)]
    order = rng.permutation(len(labels))
    return x[order].astype(np.float32), labels[order]


def _planted_with_reserve(n_benign: int, n_mal: int, d: int, shift: float, seed: int, n_reserve: int = 50):
    """A planted pool plus a clean reserve drawn from the benign distribution."""
    x, y = _planted(n_benign + n_reserve, n_mal, d, shift, seed)
    benign_rows = np.flatnonzero(y == 0)
    reserve = x[benign_rows[:n_reserve]]
    keep = np.setdiff1d(np.arange(len(y)), benign_rows[:n_reserve])
    return x[keep], y[keep], reserve


# r′ = 0.1 and 1.0: the two operating points of ML-MMDR §6.1's screening pools
OPERATING_POINTS = [(200, 20), (100, 100)]


@pytest.mark.parametrize("n_benign,n_mal", OPERATING_POINTS)
@pytest.mark.parametrize("seed", range(6))
def test_ss_oriented_by_the_reserve_separates_balanced_and_imbalanced_pools(n_benign, n_mal, seed):
    """A separable pool: the reserve-oriented score ranks every malicious row above every benign
    one (AUROC 1, f1_max 1) at r′ = 0.1 and at r′ = 1.0, where Tran et al.'s squared score is
    symmetric in the two halves."""
    x, y, reserve = _planted_with_reserve(n_benign, n_mal, 32, shift=12.0, seed=seed)
    ratio = n_mal / (n_benign + n_mal)
    out = detect_ss(x, reserve, {"removal_factor": 1.0}, assumed_ratio=ratio, rng=np.random.default_rng(0))
    assert metrics.auroc(y, out.scores) == 1.0 and metrics.best_f1(y, out.scores)["f1"] == 1.0
    # with ε̂ = the true fraction and factor 1 the rule flags exactly the malicious rows
    assert metrics.detection_scores(y, out.flagged)["f1"] == 1.0
    # factor 1.5 (Tran et al.) flags ⌈1.5·ε̂·n⌉: all malicious rows, precision exactly 1/1.5
    out15 = detect_ss(x, reserve, {}, assumed_ratio=ratio, rng=np.random.default_rng(0))
    k = n_removed(len(y), ratio, 1.5)
    assert out15.flagged.sum() == k and metrics.detection_scores(y, out15.flagged)["recall"] == 1.0
    assert metrics.detection_scores(y, out15.flagged)["precision"] == pytest.approx(n_mal / k)
    assert out15.tags == {"rule": "top 1.5·eps·n", "orient": "reserve"}


def test_ss_squared_score_cannot_split_a_balanced_pool():
    """Why the reserve orientation exists: on a pool whose malicious half mirrors the benign half
    through the pool mean, ((x−μ)·v)² gives every malicious row exactly its benign twin's score, so
    AUROC is exactly 0.5; the oriented score separates the same pool, and at r′ = 0.1 both work."""
    rng = np.random.default_rng(0)
    benign = rng.normal(size=(100, 32)) + 6.0 * np.eye(32)[0]
    x = np.vstack([benign, -benign]).astype(np.float32)  # mean 0: each malicious row = −(its twin)
    y = np.r_[np.zeros(100, int), np.ones(100, int)]
    reserve = (rng.normal(size=(50, 32)) + 6.0 * np.eye(32)[0]).astype(np.float32)
    squared = detect_ss(x, reserve, {"orient": "none"}, assumed_ratio=0.5, rng=np.random.default_rng(0))
    np.testing.assert_allclose(squared.scores[:100], squared.scores[100:], rtol=1e-6)
    assert metrics.auroc(y, squared.scores) == pytest.approx(0.5, abs=0.01)
    assert metrics.auroc(y, detect_ss(x, reserve, {}, assumed_ratio=0.5, rng=np.random.default_rng(0)).scores) == 1.0
    x, y, reserve = _planted_with_reserve(200, 20, 32, shift=12.0, seed=0)
    out = detect_ss(x, reserve, {"orient": "none"}, assumed_ratio=20 / 220, rng=np.random.default_rng(0))
    assert metrics.auroc(y, out.scores) == 1.0


def test_ss_options_and_errors():
    x, y, reserve = _planted_with_reserve(450, 50, 64, shift=8.0, seed=0)
    # a configured eps wins over the protocol's assumed ratio
    out = detect_ss(x, reserve, {"removal_factor": 1.5, "eps": 0.02}, assumed_ratio=0.1,
                    rng=np.random.default_rng(0))
    assert out.flagged.sum() == 15 and out.extra["eps_assumed"] == 0.02
    with pytest.raises(SkipPool, match="orient=none"):
        detect_ss(x, x[:0], {}, assumed_ratio=0.1, rng=np.random.default_rng(0))
    # a bad value is refused when the options are parsed (at compose time), before any pool runs
    with pytest.raises(ConfigError, match=r"defense\.ss\.orient='up' is not allowed: use one of reserve, none"):
        SSOptions.parse({"orient": "up"}, "defense.ss")
    with pytest.raises(ConfigError, match="orient='up'"):  # a dict handed to the detector is parsed the same way
        detect_ss(x, reserve, {"orient": "up"}, assumed_ratio=0.1, rng=np.random.default_rng(0))


def test_ss_wide_and_tall_features_agree():
    """The n×n and d×d eigen routes give the same score (up to float error)."""
    x, _, reserve = _planted_with_reserve(30, 10, 8, shift=5.0, seed=0, n_reserve=10)
    pad = np.zeros((40, 100), np.float32)
    wide = np.hstack([x, pad])  # d > n: Gram route
    wide_reserve = np.hstack([reserve, pad[:10]])
    for cfg in ({}, {"orient": "none"}):
        tall = detect_ss(x, reserve, cfg, assumed_ratio=0.2, rng=np.random.default_rng(0)).scores
        np.testing.assert_allclose(detect_ss(wide, wide_reserve, cfg, assumed_ratio=0.2,
                                             rng=np.random.default_rng(0)).scores, tall, rtol=1e-3, atol=1e-3)


def test_n_removed_rounds_up_without_float_noise():
    assert n_removed(110, 0.1 / 1.1, 1.5) == 15  # 1.5·(0.1/1.1)·110 = 15.000000000000002
    assert n_removed(15, 1 / 3, 1.5) == 8 and n_removed(10, 0.9, 1.5) == 10 and n_removed(10, 0.0, 1.5) == 0


@pytest.mark.parametrize("n_benign,n_mal", OPERATING_POINTS)
@pytest.mark.parametrize("seed", range(6))
def test_ac_reserve_rule_flags_the_malicious_cluster_at_every_ratio(n_benign, n_mal, seed):
    """Six separated pools at r′ = 0.1 and six at r′ = 1.0: the reserve rule flags exactly the
    planted cluster every time (the smaller-cluster rule is a coin flip at r′ = 1.0). 2 ICA dims
    keep this test about the decision rule; tests/test_ac_ica.py covers the search for the 2-means
    split in 20 whitened dims."""
    x, y, reserve = _planted_with_reserve(n_benign, n_mal, 32, shift=12.0, seed=seed)
    cfg = {**AC_CFG, "n_components": 2, "criterion": "reserve"}
    out = detect_ac(x, reserve, cfg, assumed_ratio=0.0, rng=np.random.default_rng(seed))
    assert metrics.detection_scores(y, out.flagged)["f1"] == 1.0
    assert metrics.auroc(y, out.scores) == 1.0 and out.tags == {"rule": "reserve", "reduce": "fastica"}
    assert out.extra["flagged_cluster_fraction"] == pytest.approx(n_mal / len(y))


def test_ac_reserve_rule_needs_a_reserve():
    x, _, _ = _planted_with_reserve(100, 100, 32, shift=12.0, seed=0)
    with pytest.raises(SkipPool, match="criterion=size"):
        detect_ac(x, None, {**AC_CFG, "criterion": "reserve"}, assumed_ratio=0.0, rng=np.random.default_rng(0))


def test_ac_size_and_silhouette_rules_at_an_imbalanced_pool():
    """The relative-size and silhouette options (ML-MMDR §3.3), where they are defined: r′ = 0.1."""
    cfg = {**AC_CFG, "n_components": 2}
    x, y = _planted(180, 20, 64, shift=12.0, seed=1)
    out = detect_ac(x, None, cfg, assumed_ratio=0.1, rng=np.random.default_rng(0))
    assert out.flagged.sum() == 20 and metrics.detection_scores(y, out.flagged)["f1"] == 1.0
    assert metrics.auroc(y, out.scores) == 1.0 and out.tags == {"rule": "size", "reduce": "fastica"}
    # silhouette criterion: the two planted clusters score high, one Gaussian blob low
    sil = {**cfg, "criterion": "silhouette", "silhouette_threshold": 0.5}
    out_s = detect_ac(x, None, sil, assumed_ratio=0.1, rng=np.random.default_rng(0))
    assert out_s.extra["silhouette"] >= 0.5 and np.array_equal(out_s.flagged, out.flagged)
    blob = np.random.default_rng(2).normal(size=(200, 64)).astype(np.float32)
    out_b = detect_ac(blob, None, sil, assumed_ratio=0.1, rng=np.random.default_rng(0))
    assert out_b.extra["silhouette"] < 0.5 and not out_b.flagged.any()
    assert out_b.scores.shape == (200,)  # the score still ranks, for AUROC
    # the relative-size rule of original AC: a 10 % cluster passes 0.35, not 0.05
    assert detect_ac(x, None, {**cfg, "max_size_fraction": 0.35}, assumed_ratio=0.1,
                     rng=np.random.default_rng(0)).flagged.sum() == 20
    assert not detect_ac(x, None, {**cfg, "max_size_fraction": 0.05}, assumed_ratio=0.1,
                         rng=np.random.default_rng(0)).flagged.any()
    with pytest.raises(ConfigError, match=r"defense\.ac\.criterion='vote' is not allowed: use one of "
                                          r"reserve, size, silhouette"):
        ACOptions.parse({**cfg, "criterion": "vote"}, "defense.ac")


def test_ac_pca_reduction_as_ibm_art():
    """reduce=pca (ART's default): unwhitened principal scores keep the planted direction dominant,
    so even 10 dims among isotropic noise split the planted cluster off (whitened ICA would not)."""
    x, y = _planted(180, 20, 64, shift=12.0, seed=1)
    cfg = {**AC_CFG, "n_components": 10, "reduce": "pca", "min_samples_per_component": 10}
    out = detect_ac(x, None, cfg, assumed_ratio=0.0, rng=np.random.default_rng(0))
    assert metrics.detection_scores(y, out.flagged)["f1"] == 1.0 and out.tags["reduce"] == "pca"
    with pytest.raises(ConfigError, match=r"defense\.ac\.reduce='tsne' is not allowed: use one of fastica, pca"):
        ACOptions.parse({**cfg, "reduce": "tsne"}, "defense.ac")


@pytest.mark.parametrize("n,d", [(3, 50), (12, 50), (60, 5), (40, 1)])
def test_ac_small_or_narrow_pools_run(n, d):
    x, y, reserve = _planted_with_reserve(n - n // 3, n // 3, d, shift=10.0, seed=3, n_reserve=5)
    out = detect_ac(x, reserve, AC_CFG, assumed_ratio=0.3, rng=np.random.default_rng(0))
    assert out.scores.shape == (n,) and np.all(np.isfinite(out.scores)) and out.flagged.dtype == bool
    const = detect_ac(np.ones((n, d), np.float32), reserve, AC_CFG, assumed_ratio=0.3, rng=np.random.default_rng(0))
    assert not const.flagged.any()


def test_score_pool_reports_the_rule_and_the_best_threshold():
    """f1 is the detector's own decision, f1_max the best threshold of its scores; for a detector
    without a rule (SR) both are max-F1."""
    labels = np.array([0, 0, 0, 1, 1])
    scores = np.array([0.1, 0.2, 0.3, 0.8, 0.9])
    ruled = score_pool(labels, DetectorOutput(scores, np.array([0, 0, 1, 1, 1], bool)))
    assert ruled["f1"] == pytest.approx(0.8) and ruled["precision"] == pytest.approx(2 / 3)
    assert ruled["f1_max"] == 1.0 and ruled["auroc"] == 1.0
    free = score_pool(labels, DetectorOutput(scores, None))
    assert free["f1"] == free["f1_max"] == 1.0


def _subspace_data(seed: int = 0, d: int = 40, rank: int = 5):
    rng = np.random.default_rng(seed)
    basis = np.linalg.qr(rng.normal(size=(d, rank)))[0].T  # (rank, d) orthonormal rows
    def on(n):
        return rng.normal(size=(n, rank)) * 3.0 @ basis + 0.05 * rng.normal(size=(n, d))
    off = rng.normal(size=(60, d))
    off -= off @ basis.T @ basis  # orthogonal to the clean subspace
    benign, malicious = on(100), on(60) + 2.0 * off / np.linalg.norm(off, axis=1, keepdims=True)
    x = np.vstack([benign, malicious]).astype(np.float32)
    return on(200).astype(np.float32), x, np.r_[np.zeros(100, int), np.ones(60, int)]


def test_sr_scores_off_subspace_samples_high():
    reserve, x, y = _subspace_data()
    out = detect_sr(x, reserve, {"reserve_size": 200, "energy": 0.9}, assumed_ratio=0.375,
                    rng=np.random.default_rng(0))
    assert out.flagged is None  # no own threshold: the evaluator reports max-F1
    assert metrics.auroc(y, out.scores) >= 0.95 and metrics.best_f1(y, out.scores)["f1"] >= 0.9
    assert out.extra["k"] <= 5
    with pytest.raises(SkipPool):
        detect_sr(x, reserve[:1], {"reserve_size": 200, "energy": 0.9}, assumed_ratio=0.5, rng=np.random.default_rng(0))


@pytest.mark.parametrize("n_mal", [10, 100])  # r′ = 0.1 and 1.0 next to 100 benign rows
def test_sr_separates_off_subspace_rows_at_both_operating_points(n_mal):
    """Malicious rows = on-subspace rows plus an orthogonal offset of norm 2, benign rows carry noise
    of norm ≈ 0.05·√40 ≈ 0.3 off the subspace: every malicious error exceeds every benign one."""
    reserve, x, y = _subspace_data()
    benign, malicious = x[y == 0], x[y == 1]
    rows = np.vstack([benign, np.resize(malicious, (n_mal, x.shape[1]))]).astype(np.float32)
    labels = np.r_[np.zeros(len(benign), int), np.ones(n_mal, int)]
    out = detect_sr(rows, reserve, {"reserve_size": 200, "energy": 0.9}, assumed_ratio=0.5, rng=np.random.default_rng(0))
    assert metrics.auroc(labels, out.scores) == 1.0 and metrics.best_f1(labels, out.scores)["f1"] == 1.0
    assert out.extra["k"] == 5  # the planted rank: 3σ per direction dominates the 0.05 noise


def test_sr_keeps_the_smallest_k_reaching_the_energy():
    assert energy_rank(np.array([0.5, 0.3, 0.15, 0.05]), 0.9) == 3
    assert energy_rank(np.array([0.5, 0.3, 0.15, 0.05]), 0.8) == 2  # reached exactly
    assert energy_rank(np.array([0.5, 0.3, 0.15, 0.05]), 1.0) == 4 and energy_rank(np.zeros(3), 0.9) == 0
    # ±a_i·e_i rows: PCA variance ratios exactly a_i² / Σa² = 0.5, 0.3, 0.15, 0.05
    a = np.sqrt([5.0, 3.0, 1.5, 0.5])
    x = np.vstack([np.diag(a), -np.diag(a)])
    mean, comps = fit_subspace(x, 0.9)
    assert comps.shape == (3, 4) and np.allclose(np.abs(comps), np.eye(4)[:3])
    assert fit_subspace(x, 0.95)[1].shape[0] == 3 and fit_subspace(x, 0.96)[1].shape[0] == 4
    wide = np.hstack([x, np.zeros((8, 20))])  # m < d: the Gram route gives the same subspace
    _, comps_w = fit_subspace(wide, 0.9)
    assert comps_w.shape == (3, 24) and np.allclose(np.abs(comps_w[:, :4]), np.eye(4)[:3])
    assert np.allclose(comps_w @ comps_w.T, np.eye(3))
    assert fit_subspace(np.ones((5, 4)), 0.9)[1].shape[0] == 0


def test_pool_counts_take_fewer_when_fewer_exist():
    assert pool_counts(100, 0.1, 500, 500) == (100, 10)
    assert pool_counts(20, 0.5, 19, 57) == (19, 10)  # round half up: 9.5 -> 10
    assert pool_counts(10, 1.0, 19, 3) == (10, 3) and pool_counts(10, 1.0, 0, 30) == (0, 0)


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """One tiny backdoored run with defense=[ac,ss,sr]: its records, its Experiment, and how often
    features were extracted."""
    mp = pytest.MonkeyPatch()
    seen: dict = {"features_calls": 0}
    real_features, real_ext = Experiment.features, pipeline.run_extensions

    def counting_features(self, *a, **k):
        seen["features_calls"] += 1
        return real_features(self, *a, **k)

    def capture(exp):
        seen["exp"] = exp
        return real_ext(exp)

    mp.setattr(Experiment, "features", counting_features)
    mp.setattr(pipeline, "run_extensions", capture)
    cfg = compose_cfg(with_tiny("defense=[ac,ss,sr]", "screening.sizes=[10,20]", "screening.ratios=[0.5,1.0]",
                                "screening.reserve_per_class=5", "train.epochs=6"))
    try:
        out = pipeline.run(cfg, tmp_path_factory.mktemp("run"))
    finally:
        mp.undo()
    return out, seen


def test_protocol_records_every_defense_level_and_pool(tiny_run):
    out, seen = tiny_run
    exp = seen["exp"]
    sp = exp.info["screening_pools"]
    assert screening_pools(exp) is sp and seen["features_calls"] == 1  # memoized: one extraction per run
    rows = [r for r in out["metrics"] if "defense" in r]
    count = Counter((r["defense"], r["metric"], r["level"], r["N"], r["r"]) for r in rows)
    # What each configured (N, r′) holds, tagged as it holds it: N = its benign images (fewer exist
    # than 20 here), r = r′ (enough triggered images exist); the same images are one pool.
    held = {pool_counts(n, ratio, sp.n_benign_available, sp.n_malicious_available): ratio
            for n in (20, 10) for ratio in (1.0, 0.5)}
    assert len(held) == 4 and len(sp.pools) == 4
    assert {(r["N"], r["r"]) for r in rows} == {(n_b, ratio) for (n_b, _), ratio in held.items()}
    for defense in ("ac", "ss", "sr"):
        for level in ("s1", "s2", "s3"):
            for (n_b, n_m), ratio in held.items():
                assert n_b > 0 and n_m > 0
                for m in ("f1", "f1_max", "precision", "recall", "auroc", "n_benign", "n_malicious"):
                    assert count[(defense, m, level, n_b, ratio)] == 1, (defense, m, level, n_b, ratio)
                got = {r["metric"]: r["value"] for r in rows if (r["defense"], r["level"], r["N"], r["r"])
                       == (defense, level, n_b, ratio)}
                assert (got["n_benign"], got["n_malicious"]) == (n_b, n_m)
                # the rule's F1 and the best-threshold F1 agree where they must, by construction
                if defense == "sr":  # no own rule: f1 is max-F1
                    assert got["f1"] == got["f1_max"]
                if defense == "ss":  # the rule flags a top-k prefix of the scores, so f1 <= f1_max,
                    assert got["f1"] <= got["f1_max"] + 1e-12  # and tp = precision·k = recall·n_m
                    assert got["precision"] * got["n_flagged"] == pytest.approx(got["recall"] * n_m)
    assert sp.n_benign_available < 20  # the tiny test set really exercises "fewer if fewer exist"
    for pool in sp.pools:
        assert pool.labels.sum() == pool.n_malicious and len(pool.labels) == pool.n_benign + pool.n_malicious
        assert np.any(np.diff(pool.labels) > 0) and np.any(np.diff(pool.labels) < 0)  # shuffled, not in blocks
    # pools are drawn from the right places: predicted t, clean originals outside the reserve
    t, reserve = exp.target, set(exp.reserve_index.tolist())
    assert (exp.pred_test[sp.benign_index] == t).all() and not reserve & set(sp.benign_index.tolist())
    assert (exp.pred_backdoor[sp.malicious_index] == t).all()
    assert not reserve & set(exp.backdoor_test.index[sp.malicious_index].tolist())
    assert all(len(v) == int((exp.data.y_test[exp.reserve_index] == t).sum()) for v in sp.reserve.values())


def test_detectors_see_only_features_and_the_reserve(tiny_run):
    _, seen = tiny_run
    exp = seen["exp"]
    sp = screening_pools(exp)
    for detect in (detect_ac, detect_ss, detect_sr):
        assert list(inspect.signature(detect).parameters) == ["features", "reserve", "opts", "assumed_ratio", "rng"]
    calls = []

    def spy(*args, **kwargs):
        calls.append((args, kwargs))
        return detect_ss(*args, **kwargs)

    opts = SSOptions()
    rows = run_pool_detector(exp, "spy", opts, spy)
    assert len(calls) == len(sp.levels) * len(sp.pools) and seen["features_calls"] == 1
    for (args, kwargs), (level, pool) in zip(calls, [(lv, p) for lv in sp.levels for p in sp.pools]):
        features, reserve, got_opts = args
        assert set(kwargs) == {"assumed_ratio", "rng"} and got_opts is opts
        assert isinstance(features, np.ndarray) and features.dtype == np.float32 and features.ndim == 2
        np.testing.assert_array_equal(features, sp.features[level][pool.rows])
        np.testing.assert_array_equal(reserve, sp.reserve[level])
        assert not reserve.flags.writeable and not screening_pools(exp).reserve[level].flags.writeable
        assert kwargs["assumed_ratio"] == pytest.approx(pool.ratio / (1 + pool.ratio))
    assert {r["metric"] for r in rows} >= {"f1", "auroc", "n_benign", "n_malicious"}
    # SR without a usable reserve (one image): one `skipped` record per level × pool, no crash.
    # reserve_size=1 itself is now refused when the options are parsed (SROptions: >= 2).
    with pytest.raises(ConfigError, match=r"defense\.sr\.reserve_size=1 is not allowed: use an integer >= 2"):
        SROptions.parse({"reserve_size": 1, "energy": 0.9}, "defense.sr")

    def one_image_reserve(features, reserve, opts, **kwargs):
        return detect_sr(features, reserve[:1], opts, **kwargs)

    skipped = run_pool_detector(exp, "sr", SROptions(), one_image_reserve)
    assert {r["metric"] for r in skipped} == {"skipped"} and len(skipped) == len(calls)


def test_clean_model_pools_are_skipped(tmp_path):
    out = pipeline.run(compose_cfg(with_tiny("attack=none", "defense=[ss]", "train.epochs=1")), tmp_path)
    rows = [r for r in out["metrics"] if r.get("defense") == "ss"]
    # fewer than 100 benign images and no triggered one: the four (N, r′) are the same images, one
    # pool a level, tagged with what it holds
    assert len(rows) == 3 and all(r["metric"] == "skipped" and r["value"] == 1.0 for r in rows)
    assert {r["level"] for r in rows} == {"s1", "s2", "s3"} and len({r["N"] for r in rows}) == 1
    assert 0 < rows[0]["N"] < 100 and {r["r"] for r in rows} == {0.0}


@pytest.mark.parametrize("preset", ["mlmmdr_f1", "mlmmdr_aro", "mlmmdr_lambda", "mlmmdr_kernels"])
def test_mlmmdr_presets_use_the_papers_20_ica_dims(preset):
    """ML-MMDR §6.1's AC reduces to 20 dims; the plain default stays original AC's 10."""
    ac = compose_cfg([f"experiment={preset}"]).defense.ac
    assert ac.n_components == 20 and 110 // ac.min_samples_per_component >= 20  # all 20 at the smallest pool
    assert compose_cfg([]).defense.ac.n_components == 10


def test_a_configured_but_unselected_defense_is_skipped(caplog):
    """experiment=mlmmdr_f1 defense=[ss]: the preset's defense.ac settings do not bring AC back."""
    from types import SimpleNamespace

    from bdexp.defenses import run_defenses

    cfg = compose_cfg(["experiment=mlmmdr_f1", "defense=[]"])
    assert "name" not in cfg.defense.ac
    with caplog.at_level("WARNING"):
        assert run_defenses(SimpleNamespace(cfg=cfg)) == []
    assert "defense.ac is configured but not selected" in caplog.text


def test_default_digits_run_ac_and_ss_match_sr_at_balanced_pools(tmp_path):
    """The default experiment (digits, ConvNet, patched): at r′ = 1.0, wherever SR reaches F1 ≥ 0.9,
    AC's own rule and SS's best-threshold F1 do too (their old rules were a coin flip / capped at
    0.8 there); SS's removal rule stays under its 1/1.5-precision ceiling."""
    out = pipeline.run(compose_cfg(["analysis=[]", "progress=false", "device=cpu"]), tmp_path)
    got = {(r["defense"], r["metric"], r["level"], r["N"]): r["value"] for r in out["metrics"]
           if r.get("defense") in ("ac", "ss", "sr") and r.get("r") == 1.0}
    sizes = {n for (_, _, _, n) in got}
    assert len(sizes) == 1 and sizes.pop() < 100  # fewer benign images than N = 100 exist: one pool
    checked = 0
    for level in ("s1", "s2", "s3"):
        for n in {n for (_, _, _, n) in got}:
            if got[("sr", "f1", level, n)] >= 0.9:
                checked += 1
                assert got[("ac", "f1", level, n)] >= 0.9, (level, n)
                assert got[("ss", "f1_max", level, n)] >= 0.9, (level, n)
                assert got[("ss", "f1", level, n)] <= 0.8 + 1e-9
    assert checked >= 3


def test_pools_are_tagged_with_what_they_hold_and_identical_pools_are_one(caplog):
    """screening.sizes=[100000, 100] on a test set with a few dozen benign images predicted as the
    target: both sizes hold the very same images, so there is one pool per r′, tagged with the N it
    holds (not 100 000), and the log says so."""
    from bdexp.pipeline import build_experiment

    cfg = compose_cfg(with_tiny("defense=[ss]", "screening.sizes=[100000,100]", "screening.ratios=[1.0,0.5]",
                                "screening.reserve_per_class=5"))
    exp, _ = build_experiment(cfg, torch.device("cpu"), None)
    with caplog.at_level("WARNING"):
        sp = screening_pools(exp)
    n_b = sp.n_benign_available
    assert 0 < n_b < 100 and len(sp.pools) == 2  # not 4: N = 100 000 and N = 100 are the same images
    assert [p.tags for p in sp.pools] == [{"N": n_b, "r": 1.0}, {"N": n_b, "r": 0.5}]
    assert "N=100000 r'=1 and N=100 r'=1 hold" in caplog.text and f"recorded as N={n_b}" in caplog.text
    rows = run_pool_detector(exp, "ss", SSOptions(), detect_ss)
    assert {(r["N"], r["r"]) for r in rows} == {(n_b, 1.0), (n_b, 0.5)}
    assert sum(r["metric"] == "f1" for r in rows) == 2 * len(sp.levels)  # each pool scored once per level
