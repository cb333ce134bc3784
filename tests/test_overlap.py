"""The overlap-index bound (OVL Theorem 1 / Corollary 1; docs/analyses.md) against distributions with a
known overlap, and the one-class scorer built on it (OVL §III)."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from sklearn.metrics import roc_auc_score

from bdexp.analysis.overlap import CENTERS, OverlapScorer, norm_name, overlap_bound

NORMS = (1, 2, math.inf)
N = 4000
# The bound is computed from sample means, a sample max norm and sample ball fractions; with 4000
# points per side their standard errors are ~0.01 of the bound's scale, so a true upper bound may
# come out that much below the true overlap (the tight cases below show it does, by < 0.01).
TOL = 0.02


def _phi(z: float) -> float:
    return 0.5 * (1 + math.erf(z / math.sqrt(2)))


def _boxes(rng, d: int, s: float):
    """Uniform [0,1]^d vs [s,1+s]^d: η = (1 − s)^d (0 when s ≥ 1)."""
    return rng.random((N, d)), rng.random((N, d)) + s, max(0.0, 1 - s) ** d


def _gaussians(rng, d: int, delta: float):
    """N(0, I) vs N(δ·e1, I): η = 2Φ(−δ/2) (two Gaussians of equal σ overlap by 2Φ(−|μ1−μ2|/2σ), σ = 1 here)."""
    q = rng.normal(size=(N, d))
    q[:, 0] += delta
    return rng.normal(size=(N, d)), q, 2 * _phi(-delta / 2)


def _shell(rng, m: int, d: int) -> np.ndarray:
    v = rng.normal(size=(m, d))
    return v / np.linalg.norm(v, axis=1, keepdims=True)


def _tight(rng, eps: float, kind: str, d: int = 2, radius: float = 3.0):
    """A shared unit-shell component of mass 1 − ε plus an ε atom of each side's own, so η = 1 − ε.
    'opposite': atoms at ±R·e1 → ‖μ_P − μ_Q‖ = 2εR = 2εD and the mean term alone is tight.
    'atom0': atoms at 0 and R·e1 → the mean term gives ε/2, the ball {‖x‖ ≤ 0} the other ε/2
    (about the origin: OVL's form), so the bound is tight only through the radius term."""
    k = round(eps * N)
    e = np.zeros(d)
    e[0] = radius
    a, b = (e, -e) if kind == "opposite" else (np.zeros(d), e)
    p = np.concatenate([_shell(rng, N - k, d), np.tile(a, (k, 1))])
    q = np.concatenate([_shell(rng, N - k, d), np.tile(b, (k, 1))])
    return p, q, 1 - eps


CASES = [
    ("boxes", 1, 0.2), ("boxes", 1, 0.5), ("boxes", 2, 0.3),
    ("gaussians", 1, 1.0), ("gaussians", 1, 2.0), ("gaussians", 3, 2.0),
    ("opposite", 2, 0.3), ("atom0", 2, 0.3),
]


def _case(kind: str, d: int, v: float, seed: int):
    rng = np.random.default_rng(seed)
    if kind == "boxes":
        return _boxes(rng, d, v)
    if kind == "gaussians":
        return _gaussians(rng, d, v)
    return _tight(rng, v, kind, d)


def test_identical_samples_give_exactly_one():
    p = np.random.default_rng(0).normal(3.0, 2.0, size=(300, 5))
    for norm in (*NORMS, "inf", 2.0):
        for center in CENTERS:
            assert overlap_bound(p, p.copy(), norm, 10, center=center) == 1.0
            assert overlap_bound(torch.as_tensor(p, dtype=torch.float32), torch.as_tensor(p, dtype=torch.float32),
                                 norm, 10, center=center) == 1.0
    assert overlap_bound(np.ones((5, 3)), np.ones((7, 3)), 2, 10) == 1.0  # D = 0: both point masses at one spot


@pytest.mark.parametrize("kind,d,v", CASES, ids=[f"{k}-d{d}-{v}" for k, d, v in CASES])
def test_bound_never_falls_below_the_true_overlap(kind, d, v):
    for seed in range(3):
        p, q, eta = _case(kind, d, v, seed)
        for norm in NORMS:
            for center in ("best", "pooled", "origin"):
                b = overlap_bound(p, q, norm, 10, center=center)
                assert eta - TOL <= b <= 1.0, (kind, d, v, seed, norm_name(norm), center, b, eta)


@pytest.mark.parametrize("kind,center", [("opposite", "best"), ("opposite", "origin"), ("atom0", "origin")])
def test_the_bound_is_attained_where_theorem_1_is_tight(kind, center):
    """Where the proof's inequalities are equalities the bound equals η (a factor-2 slip in either
    term would show); for 'atom0' the mean term alone is off by ε/2."""
    p, q, eta = _tight(np.random.default_rng(1), 0.3, kind)
    for norm in NORMS:  # the atoms lie on e1, where all three norms agree
        assert overlap_bound(p, q, norm, 10, center=center) == pytest.approx(eta, abs=TOL)
    if kind == "atom0":
        assert overlap_bound(p, q, 2, 0, center="origin") == pytest.approx(1 - 0.3 / 2, abs=TOL)


def test_one_dimensional_boxes_match_the_closed_form():
    """About the midpoint of U[0,1] and U[s,1+s] every ball holds equal mass of both, D = (1+s)/2 and
    ‖μ_P − μ_Q‖ = s, so the bound is 1 − s/(1+s) = 1/(1+s) ≥ 1 − s = η."""
    rng = np.random.default_rng(2)
    for s in (0.2, 0.5, 0.8):
        p, q, eta = _boxes(rng, 1, s)
        assert overlap_bound(p, q, 2, 10, center="pooled") == pytest.approx(1 / (1 + s), abs=TOL)
        assert 1 / (1 + s) >= eta


def test_disjoint_distributions_fall_with_separation():
    rng = np.random.default_rng(3)
    for make, seps in ((lambda s: _boxes(rng, 1, s), (1.0, 2.0, 4.0, 8.0)),
                       (lambda s: _gaussians(rng, 3, s), (8.0, 16.0, 32.0, 64.0))):
        for norm in NORMS:
            bounds = [overlap_bound(*make(s)[:2], norm, 10) for s in seps]
            assert bounds[0] < 1 and all(a > b for a, b in zip(bounds, bounds[1:])), (norm, bounds)


def test_centring_makes_the_bound_translation_invariant_and_symmetric():
    p, q, eta = _boxes(np.random.default_rng(4), 3, 0.3)
    offset = np.full(3, 100.0)  # e.g. data that never sit near the origin
    for norm in NORMS:
        b = overlap_bound(p, q, norm, 10)
        assert overlap_bound(p + offset, q + offset, norm, 10) == pytest.approx(b, abs=1e-9)
        assert overlap_bound(q, p, norm, 10) == pytest.approx(b, abs=1e-12)
        raw = overlap_bound(p + offset, q + offset, norm, 10, center="origin")  # OVL's form: D ≈ ‖offset‖
        assert eta <= b < raw - 0.2 and raw > 0.95


def test_inputs_and_errors():
    rng = np.random.default_rng(5)
    x, y = rng.normal(size=200), rng.normal(size=150) + 1
    flat = overlap_bound(x, y, 2, 10)
    assert flat == overlap_bound(torch.as_tensor(x[:, None]), torch.as_tensor(y[:, None]), 2, 10) and 0 < flat < 1
    with pytest.raises(ValueError, match="differ in dimension"):
        overlap_bound(rng.normal(size=(10, 3)), rng.normal(size=(10, 4)), 2, 10)
    for bad in (3, 0, "l2", "two", None, True):
        with pytest.raises(ValueError, match="choose one of 1, 2, inf"):
            overlap_bound(x, y, norm=bad, num_radii=10)
        with pytest.raises(ValueError, match="choose one of 1, 2, inf"):
            OverlapScorer(norm=bad, num_radii=10, center="p")
    with pytest.raises(ValueError, match="center"):
        overlap_bound(x, y, 2, 10, center="median")
    with pytest.raises(ValueError, match="empty"):
        overlap_bound(x[:0], y, 2, 10)
    with pytest.raises(ValueError, match="num_radii"):
        overlap_bound(x, y, 2, num_radii=-1)


# ---- the one-class scorer ---------------------------------------------------------------------------

@pytest.mark.parametrize("center", ["p", "origin"])
def test_scorer_equals_the_bound_against_a_point_mass(center):
    rng = np.random.default_rng(6)
    feats = rng.normal(size=(300, 6)) + 0.5
    # in-class points, outliers, a point far beyond every in-class norm (D = ‖x − c‖), the mean
    x = np.concatenate([feats[:3], rng.normal(size=(3, 6)) * 3, np.full((1, 6), 40.0), feats.mean(0, keepdims=True)])
    for norm in NORMS:
        scorer = OverlapScorer(norm, num_radii=10, center=center).fit(torch.as_tensor(feats))
        got = scorer.score(torch.as_tensor(x))
        assert got.shape == (len(x),) and got.dtype == torch.float64
        want = [overlap_bound(feats, x[i:i + 1], norm, 10, center=center, radii_from="p") for i in range(len(x))]
        assert got.tolist() == pytest.approx(want, abs=1e-12)
        assert ((got >= 0) & (got <= 1)).all()


def test_scorer_ranks_in_class_above_out_of_class():
    """Two unit Gaussians 6σ apart in 16-D: separable by the distance to the in-class mean."""
    rng = np.random.default_rng(7)
    d = 16
    feats = rng.normal(size=(200, d))
    inside = rng.normal(size=(300, d))
    direction = rng.normal(size=d)
    outside = rng.normal(size=(300, d)) + 6 * direction / np.linalg.norm(direction)
    for norm in NORMS:
        s = OverlapScorer(norm, 10, "p").fit(feats)
        scores = torch.cat([s.score(inside), s.score(outside)]).numpy()
        labels = np.r_[np.ones(300), np.zeros(300)]  # higher score = more in-class
        assert roc_auc_score(labels, scores) > 0.9, norm_name(norm)


def test_scorer_errors():
    with pytest.raises(RuntimeError, match="before fit"):
        OverlapScorer(2, 10, "p").score(np.zeros((2, 3)))
    s = OverlapScorer(2, 10, "p").fit(np.zeros((4, 3)) + np.arange(4)[:, None])
    with pytest.raises(ValueError, match="dimension 2"):
        s.score(np.zeros((2, 2)))
    with pytest.raises(ValueError, match="center"):
        OverlapScorer(2, 10, center="pooled")
