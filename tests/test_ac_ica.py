"""Activation Clustering's reduction and 2-means are well-posed (bdexp/defenses/ac.py, docs/defenses.md):
on a separable pool AC flags the same rows whatever the pool's row order and the seed, a degenerate
FastICA unmixing is detected and replaced by the whitened principal scores, and the 2-means helpers
give the known optimum."""
from __future__ import annotations

import itertools

import numpy as np
import pytest
from sklearn.cluster import KMeans
from sklearn.decomposition import FastICA

from bdexp import metrics
from bdexp.defenses import ac
from bdexp.defenses.ac import best_split, detect_ac, max_source_corr, principal_scores, split_starts, two_means, whitened
from tests.test_detectors import _planted_with_reserve

PRESETS = {
    "ac.yaml": {},  # 10 dims, at most one per 10 rows
    "mlmmdr": {"n_components": 20, "min_samples_per_component": 5},  # conf/experiment/mlmmdr_*.yaml
}


def inertia(z: np.ndarray, labels: np.ndarray) -> float:
    return float(sum(((z[labels == c] - z[labels == c].mean(0)) ** 2).sum() for c in (0, 1)))


def f1(labels: np.ndarray, flagged: np.ndarray) -> float:
    return metrics.detection_scores(labels, flagged)["f1"]


@pytest.mark.parametrize("preset", list(PRESETS))
def test_ac_flags_the_planted_half_in_every_row_order_and_seed(preset):
    """A separable 60 + 60 pool (one direction shifted by 12 σ) in four row orders, each with its own
    seed: F1 1.0 every time. With k-means++ restarts alone the mlmmdr setting (20 whitened dims)
    split on noise (F1 0.4-0.8). 10 restarts instead of the default 100 keep the test fast: fewer
    restarts only weaken k-means++, the split starts carry the result."""
    x, y, reserve = _planted_with_reserve(60, 60, 64, shift=12.0, seed=0)
    opts = {**PRESETS[preset], "n_init": 10}
    for seed in range(4):
        order = np.random.default_rng(seed).permutation(len(y))
        out = detect_ac(x[order], reserve, opts, assumed_ratio=0.5, rng=np.random.default_rng(seed))
        assert f1(y[order], out.flagged) == 1.0, (preset, seed)
        assert out.extra["ica_degenerate"] == 0.0 and out.extra["ica_max_source_corr"] < 1e-9
        assert out.extra["ica_dims"] == (20 if preset == "mlmmdr" else 10)


def test_kmeans_pp_restarts_stop_short_of_the_planted_split_the_starts_reach():
    """Why the split starts exist: in the whitened 20-dim scores of a separable pool the planted
    partition has the lowest inertia, yet Lloyd's algorithm from 20 k-means++ seedings ends in
    higher-inertia noise splits; started from the best 1-D split of each dim it reaches the planted
    one, and detect_ac records the restarts' excess."""
    x, y, reserve = _planted_with_reserve(60, 60, 64, shift=12.0, seed=0)
    z = whitened(principal_scores(x, 20))
    planted = inertia(z, y)
    restarts = KMeans(n_clusters=2, n_init=20, random_state=0).fit(z)
    assert restarts.inertia_ > planted * 1.005
    km, excess = two_means(z, split_starts(z), 20, seed=0)
    assert f1(y, km.labels_ == km.labels_[y == 1][0]) == 1.0
    assert km.inertia_ == pytest.approx(planted, rel=1e-9)
    assert excess == pytest.approx((restarts.inertia_ - planted) / planted, rel=1e-6)


class CollapsedFastICA(FastICA):
    """A FastICA whose unmixing collapsed, as reported on a digits s3 pool: every source is one and
    the same (here the last whitened principal score, a noise direction), output covariance all
    ones, so k-means can only split that copied source."""

    def fit_transform(self, X, y=None):
        super().fit_transform(X)
        return np.repeat(whitened(X)[:, -1:], X.shape[1], axis=1)


class OverflowingFastICA(FastICA):
    """A FastICA whose unmixing overflowed: scipy's eigh refuses the infinite matrix."""

    def fit_transform(self, X, y=None):
        raise ValueError("array must not contain infs or NaNs")


@pytest.mark.parametrize("stand_in", [CollapsedFastICA, OverflowingFastICA])
def test_a_degenerate_unmixing_falls_back_to_the_whitened_scores(monkeypatch, stand_in):
    """18 + 18 rows (the default digits run's s3 pool size, 3 dims): with the unmixing degenerate AC
    clusters the whitened principal scores, a sound unmixing's rotation, and says so."""
    x, y, reserve = _planted_with_reserve(18, 18, 64, shift=12.0, seed=1)
    opts = {"n_init": 10}
    sound = detect_ac(x, reserve, opts, assumed_ratio=0.5, rng=np.random.default_rng(0))
    monkeypatch.setattr(ac, "FastICA", stand_in)
    for seed in range(3):
        out = detect_ac(x, reserve, opts, assumed_ratio=0.5, rng=np.random.default_rng(seed))
        assert f1(y, out.flagged) == 1.0 and np.array_equal(out.flagged, sound.flagged)
        assert out.extra["ica_degenerate"] == 1.0 and out.extra["ica_dims"] == 3
        np.testing.assert_allclose(out.scores, sound.scores, rtol=1e-6, atol=1e-9)  # same space up to rotation
    if stand_in is CollapsedFastICA:
        assert out.extra["ica_max_source_corr"] == pytest.approx(1.0)
    else:
        assert "ica_max_source_corr" not in out.extra


def test_max_source_corr_known_answers():
    signs = np.array(list(itertools.product([-1.0, 1.0], repeat=3)))  # 8 rows, columns exactly uncorrelated
    assert max_source_corr(signs) == pytest.approx(0.0, abs=1e-12) and max_source_corr(signs[:, :1]) == 0.0
    assert max_source_corr(np.c_[signs[:, 0], signs[:, 0]]) == pytest.approx(1.0)
    assert max_source_corr(np.c_[signs[:, 0], -signs[:, 0], signs[:, 1]]) == pytest.approx(1.0)
    assert np.isnan(max_source_corr(np.c_[signs[:, 0], np.ones(8)]))
    assert np.isnan(max_source_corr(np.c_[signs[:, 0], np.full(8, np.inf)]))


@pytest.mark.parametrize("n", [2, 3, 7, 10])
def test_best_split_is_the_exact_1d_two_means(n):
    """Against every partition of n values into two non-empty groups."""
    v = np.random.default_rng(n).standard_t(2, size=n)
    best = min(inertia(v[:, None], np.array(bits)) for bits in itertools.product([0, 1], repeat=n)
               if 0 < sum(bits) < n)
    labels = best_split(v)
    assert 0 < labels.sum() < n and inertia(v[:, None], labels) == pytest.approx(best, rel=1e-12)
    assert np.array_equal(best_split(np.array([0.0, 5.1, 0.2, 5.0, 0.1])), [0, 1, 0, 1, 0])
