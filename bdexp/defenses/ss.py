"""Spectral Signatures (Tran et al. 2018; ML-MMDR §3.3 and §6.1): project a pool's centred features
on their top right singular vector, score each input by its projection, flag the top
⌈removal_factor·ε̂·n⌉ (ε̂ the defender's assumed poison fraction; Tran et al. remove 1.5 times the
expected poison).

Tran et al.'s outlier score is the squared projection ((x − μ)·v)². On a balanced pool (r′ = 1.0,
N benign + N malicious) the two halves sit at ±a along v, so that score cannot tell them apart
(AUROC 0.5 on a separable 100 + 100 pool), yet ML-MMDR §6.1 reports SS F1 0.985 at N = 500,
r′ = 1.0 (for its SL-MMDR models). The defender of this protocol holds clean target-class images (the reserve), so the
default (`orient: reserve`) scores the signed projection (x − μ)·v, oriented so that the reserve's
mean falls on the low side: the half away from the clean data scores high at every r′, and at
r′ = 0.1 the far tail of the benign side is no longer flagged with the poison. `orient: none`
is Tran et al.'s squared score.

Two F1 values come out of every pool (screening.score_pool): `f1` of the removal rule, whose
precision is at most 1/removal_factor when ε̂ is the true fraction (F1 ≤ 0.8 at 1.5), and
`f1_max` at the best threshold (how SR is scored in ML-MMDR §6.1).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import numpy as np

from bdexp.defenses import DEFENSES
from bdexp.defenses.contexts import Kind
from bdexp.defenses.screening import DetectorOutput, SkipPool
from bdexp.defenses.subspace import principal_axes
from bdexp.options import Options, option


@dataclass(frozen=True)
class SSOptions(Options):
    """conf/defense/ss.yaml explains each value."""

    removal_factor: float = option(1.5, lo=0)  # flag the top removal_factor·ε̂·n (Tran et al.: 1.5)
    eps: float | None = option(None, lo=0, hi=1)  # ε̂; null = the pool's r′/(1+r′)
    orient: Literal["reserve", "none"] = "reserve"


def top_direction(features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(μ (d,), v (d,)): the mean and the top right singular vector of the centred (n, d) matrix
    (zero when every row is the same)."""
    ax = principal_axes(features, 1)
    v = ax.axes[0] if len(ax.axes) else np.zeros(np.asarray(features).shape[1])
    return ax.mean, v


def spectral_projection(features: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """((x − μ)·v per row, μ, v)."""
    mu, v = top_direction(features)
    proj = (np.asarray(features, dtype=np.float64) - mu) @ v
    return proj, mu, v


def spectral_scores(features: np.ndarray) -> np.ndarray:
    """Tran et al.'s outlier score ((x − μ)·v)²."""
    return spectral_projection(features)[0] ** 2


def oriented_scores(features: np.ndarray, reserve: np.ndarray) -> np.ndarray:
    """(x − μ)·v signed so that the clean reserve's mean projects at or below 0: high = away from
    the clean data along the top singular direction."""
    proj, mu, v = spectral_projection(features)
    side = float((np.asarray(reserve, dtype=np.float64).mean(0) - mu) @ v)
    return -proj if side > 0 else proj


def n_removed(n: int, eps: float, factor: float) -> int:
    """⌈factor·ε̂·n⌉ clipped to [0, n]; a hair below the ceiling so 15.000000000000002 stays 15."""
    return int(min(max(math.ceil(factor * eps * n - 1e-9), 0), n))


@DEFENSES.register("ss", options=SSOptions, kind=Kind.pool_detector)
def detect_ss(features: np.ndarray, reserve: np.ndarray | None, opts: SSOptions, *, assumed_ratio: float,
              rng: np.random.Generator) -> DetectorOutput:
    """ε̂ = `eps` when set, else the protocol's assumed_ratio r′/(1+r′). The reserve orients the
    score (`orient: reserve`) and is not used otherwise."""
    opts = SSOptions.of(opts)
    orient = opts.orient
    if orient == "reserve":
        if reserve is None or len(reserve) == 0:
            raise SkipPool("ss.orient=reserve needs clean reserve images of the target class "
                           "(raise screening.reserve_per_class, or set defense.ss.orient=none)")
        scores = oriented_scores(features, reserve)
    else:
        scores = spectral_scores(features)
    eps = float(assumed_ratio if opts.eps is None else opts.eps)
    factor = opts.removal_factor
    k = n_removed(len(scores), eps, factor)
    flagged = np.zeros(len(scores), dtype=bool)
    flagged[np.argsort(-scores, kind="stable")[:k]] = True
    return DetectorOutput(scores, flagged, {"n_flagged": float(k), "eps_assumed": eps},
                          {"rule": f"top {factor:g}·eps·n", "orient": orient})

