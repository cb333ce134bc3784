"""A finite-sample upper bound on the overlap index and the one-class score built on it (OVL §II,
Corollary 1, Alg. 1–2; the formulas are lost in the paper's extracted text, so the form below is our
reconstruction).

Overlap η(P,Q) = ∫ min(p, q) = 1 − TV(P,Q). On a domain with sup‖x‖ ≤ D and any set A with
r_A = sup_{x∈A} ‖x‖ (OVL Theorem 1, any norm):

    η(P,Q) ≤ 1 − ‖μ_P − μ_Q‖ / (2D) − (D − r_A)·|P(A) − Q(A)| / (2D)

because ‖μ_P − μ_Q‖ ≤ r_A·δ_A + D·δ_{Aᶜ}, δ_A + δ_{Aᶜ} = 2(1 − η) and δ_A ≥ |P(A) − Q(A)|.
OVL's condition functions are balls A_r = {‖x‖ ≤ r}; the bound is the minimum over K radii (OVL
§II-C, K = 10) and over A = ∅ (the mean term alone). Means, D and P(A_r), Q(A_r) are estimated
from the samples, so the result estimates the population bound (it is not a high-probability bound).

Centring (**gap**, our choice): η is translation invariant, so the theorem holds for both
distributions shifted by any common point c, with D = max ‖x − c‖ and balls around c; every c
gives a valid bound, so the minimum over several does too. OVL centres at the origin, which makes
the bound depend on where the data sit (pixels in [0, 1], ReLU features: large D, a bound near 1).
The default `center="best"` takes the minimum over c ∈ {pooled mean, μ_P, μ_Q}: translation
invariant and symmetric in P and Q; on data far from the origin it is far tighter than OVL's form,
on data centred at the origin within sampling noise of it (tests/test_overlap.py). Centring at the pooled mean alone is *not* always tighter than the origin
(balls around the midpoint of two shifted Gaussians hold equal mass of both, so the radius term
vanishes), which is why μ_P and μ_Q are in the set. The one-class scorer centres at μ_P.
"""
from __future__ import annotations

import math
from typing import Literal

import numpy as np
import torch
from torch import Tensor

NORM_NAMES: dict[float, str] = {1.0: "l1", 2.0: "l2", math.inf: "linf"}  # the norms OVL evaluates (§IV)
# A norm as an option declares it (bdexp/options.py): 1, 2 or inf (`inf` in YAML is the string 'inf')
Norm = Literal[1, 2, "inf", math.inf]
CENTERS = ("best", "pooled", "p", "q", "origin")
Center = Literal[CENTERS]
RADII_FROM = ("pooled", "p")


def norm_order(norm) -> float:
    """The vector-norm order of `norm` ∈ {1, 2, inf, 'inf'}; anything else is a ValueError."""
    if isinstance(norm, str) and norm.strip().lower() == "inf":
        return math.inf
    if isinstance(norm, (int, float, np.integer, np.floating)) and not isinstance(norm, bool) and float(norm) in NORM_NAMES:
        return float(norm)
    raise ValueError(f"norm={norm!r}; choose one of 1, 2, inf (float('inf') or the string 'inf')")


def norm_name(norm) -> str:
    """'l1', 'l2' or 'linf': the tag results carry."""
    return NORM_NAMES[norm_order(norm)]


def _as_2d(x, name: str) -> Tensor:
    """(n, d) float64 tensor from a tensor or array; 1-D input is n scalars, i.e. (n, 1)."""
    t = torch.as_tensor(np.asarray(x) if not isinstance(x, Tensor) else x)
    if t.dim() == 1:
        t = t[:, None]
    if t.dim() != 2:
        raise ValueError(f"{name} must be (n, d) or (n,), got shape {tuple(t.shape)}")
    if len(t) == 0:
        raise ValueError(f"{name} is empty")
    return t.to(torch.float64)


def _num_radii(k) -> int:
    if isinstance(k, bool) or int(k) != k or k < 0:
        raise ValueError(f"num_radii={k!r} must be a non-negative integer")
    return int(k)


def _radii(norms: Tensor, k: int) -> Tensor:
    """K radii at the interior quantile levels 1/(K+1) … K/(K+1) of `norms` (OVL §II-C: a family
    of balls; the end points are useless: r = D gives a zero term)."""
    levels = torch.arange(1, k + 1, dtype=torch.float64, device=norms.device) / (k + 1)
    return torch.quantile(norms, levels) if k else norms.new_zeros(0)


def _bound(gap: Tensor, d_max: Tensor, radii: Tensor, p_frac: Tensor, q_frac: Tensor) -> Tensor:
    """min over {∅, A_r1..A_rK} of the module docstring's right-hand side, clipped to [0, 1].
    gap, d_max: (...,); radii, p_frac, q_frac: broadcastable to (..., K)."""
    safe = torch.where(d_max > 0, d_max, torch.ones_like(d_max))
    ball = (d_max[..., None] - radii).clamp_min(0) * (p_frac - q_frac).abs()  # (D − r)·|P(A) − Q(A)|
    worst = ball.amax(-1).clamp_min(0) if ball.shape[-1] else torch.zeros_like(gap)  # A = ∅ gives 0
    value = 1 - gap / (2 * safe) - worst / (2 * safe)
    value = torch.where(d_max > 0, value, torch.ones_like(value))  # every point at the centre: P = Q
    return value.clamp(0.0, 1.0)


def _bound_about(p: Tensor, q: Tensor, center: Tensor, gap: Tensor, order: float, k: int, radii_from: str) -> Tensor:
    """The bound with balls around `center` (both samples shifted by it; η is unchanged)."""
    np_ = torch.linalg.vector_norm(p - center, ord=order, dim=1)
    nq = torch.linalg.vector_norm(q - center, ord=order, dim=1)
    d_max = torch.maximum(np_.max(), nq.max())  # D must cover both samples (Theorem 1: sup‖x‖ ≤ D)
    radii = _radii(torch.cat([np_, nq]) if radii_from == "pooled" else np_, k)
    p_frac = (np_[:, None] <= radii).to(torch.float64).mean(0)
    q_frac = (nq[:, None] <= radii).to(torch.float64).mean(0)
    return _bound(gap, d_max, radii, p_frac, q_frac)


def overlap_bound(p, q, norm, num_radii: int, *, center: str = "best", radii_from: str = "pooled") -> float:
    """Upper bound on η(P, Q) from samples p (n, d) and q (m, d) (OVL Corollary 1).

    center: where the balls A_r sit and D is measured from (module docstring): "pooled" (mean of
    both samples), "p" (μ_P), "q" (μ_Q), "origin" (OVL's form), or "best" (the smallest of the
    pooled/p/q bounds: each is a valid bound, so their minimum is; translation invariant and
    symmetric in p, q). radii_from: quantiles of the norms of both samples ("pooled") or of p
    alone ("p", the one-class setting: `OverlapScorer` computes exactly
    overlap_bound(p, x[None], center="p", radii_from="p")).
    """
    p2 = _as_2d(p, "p")
    q2 = _as_2d(q, "q").to(p2.device)
    if p2.shape[1] != q2.shape[1]:
        raise ValueError(f"p and q differ in dimension: p is {tuple(p2.shape)}, q is {tuple(q2.shape)}")
    if center not in CENTERS:
        raise ValueError(f"center={center!r}; choose one of {CENTERS}")
    if radii_from not in RADII_FROM:
        raise ValueError(f"radii_from={radii_from!r}; choose one of {RADII_FROM}")
    order, k = norm_order(norm), _num_radii(num_radii)
    mu_p, mu_q = p2.mean(0), q2.mean(0)
    gap = torch.linalg.vector_norm(mu_p - mu_q, ord=order)  # translation invariant: no centring needed
    n, m = len(p2), len(q2)
    centers = {"pooled": lambda: (n * mu_p + m * mu_q) / (n + m), "p": lambda: mu_p, "q": lambda: mu_q,
               "origin": lambda: torch.zeros_like(mu_p)}
    names = ("pooled", "p", "q") if center == "best" else (center,)
    return float(min(_bound_about(p2, q2, centers[c](), gap, order, k, radii_from) for c in names))


class OverlapScorer:
    """One-class confidence score (OVL §III-B, Alg. 2): the overlap bound between the in-class
    samples P and the point mass at an input x; higher = more in-class.

    fit() keeps only the centre, μ_P, max norm, K radii (quantiles of the in-class norms, our
    choice) and P(A_r); score() is then O(K) per input after its norm (OVL §III-C). For one point,
    μ_Q = x and Q(A_r) = 1[‖x − c‖ ≤ r]; D = max(in-class max norm, ‖x − c‖) so it covers both.
    center="p" puts the balls around μ_P, "origin" is OVL's form. score(x)[i] equals
    overlap_bound(feats, x[i:i+1], norm, num_radii, center=center, radii_from="p").
    """

    def __init__(self, norm, num_radii: int, center: str):
        if center not in ("p", "origin"):
            raise ValueError(f"center={center!r}; choose 'p' (the in-class mean) or 'origin'")
        self.order = norm_order(norm)
        self.num_radii = _num_radii(num_radii)
        self.center = center
        self.mean_: Tensor | None = None

    def fit(self, feats) -> "OverlapScorer":
        p = _as_2d(feats, "feats")
        self.mean_ = p.mean(0)
        self.center_ = self.mean_ if self.center == "p" else torch.zeros_like(self.mean_)
        norms = torch.linalg.vector_norm(p - self.center_, ord=self.order, dim=1)
        self.d_max_ = norms.max()
        self.radii_ = _radii(norms, self.num_radii)
        self.p_frac_ = (norms[:, None] <= self.radii_).to(torch.float64).mean(0)
        return self

    def score(self, x) -> Tensor:
        """(m,) float64 scores of the rows of x (m, d), on x's device."""
        if self.mean_ is None:
            raise RuntimeError("OverlapScorer.score called before fit")
        x2 = _as_2d(x, "x")
        dev = x2.device
        if x2.shape[1] != len(self.mean_):
            raise ValueError(f"x has dimension {x2.shape[1]}, the scorer was fitted on {len(self.mean_)}")
        mean, center, radii = self.mean_.to(dev), self.center_.to(dev), self.radii_.to(dev)
        gap = torch.linalg.vector_norm(mean - x2, ord=self.order, dim=1)  # ‖μ_P − μ_Q‖ with μ_Q = x
        u = torch.linalg.vector_norm(x2 - center, ord=self.order, dim=1)
        d_max = torch.maximum(self.d_max_.to(dev), u)
        q_frac = (u[:, None] <= radii).to(torch.float64)
        return _bound(gap, d_max, radii, self.p_frac_.to(dev), q_frac)
