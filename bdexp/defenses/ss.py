"""Spectral Signatures (Tran et al.; SPEC §5.2, ML-MMDR §6.1): project a pool's centred features
on their top right singular vector; the squared projection is the outlier score and the top
⌈removal_factor·ε̂·n⌉ are flagged, ε̂ the defender's assumed poison fraction."""
from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch

from bdexp.defenses import DEFENSES
from bdexp.defenses.screening import DetectorOutput, run_pool_detector


def spectral_scores(features: np.ndarray) -> np.ndarray:
    """((x − μ)·v)² with v the top right singular vector of the centred (n, d) matrix.

    With Xc = U S Vᵀ, (Xc v₁)² = σ₁² u₁², so the top eigenpair of the smaller of XcXcᵀ (n×n) and
    XcᵀXc (d×d) suffices: one matmul plus a small symmetric eigensolve, for any width d."""
    x = torch.from_numpy(np.asarray(features, dtype=np.float32))
    xc = x - x.mean(0, dtype=torch.float64).float()
    n, d = xc.shape
    if n <= d:
        vals, vecs = torch.linalg.eigh((xc @ xc.T).double())
        return (vals[-1].clamp_min(0) * vecs[:, -1] ** 2).numpy()
    _, vecs = torch.linalg.eigh((xc.T @ xc).double())
    return ((xc.double() @ vecs[:, -1]) ** 2).numpy()


def n_removed(n: int, eps: float, factor: float) -> int:
    """⌈factor·ε̂·n⌉ clipped to [0, n]; a hair below the ceiling so 15.000000000000002 stays 15."""
    return int(min(max(math.ceil(factor * eps * n - 1e-9), 0), n))


def detect_ss(features: np.ndarray, reserve: np.ndarray, dcfg: Any, *, assumed_ratio: float,
              rng: np.random.Generator) -> DetectorOutput:
    """ε̂ = `eps` when set, else the protocol's assumed_ratio r′/(1+r′) (SPEC §5.2). Uses no reserve."""
    scores = spectral_scores(features)
    eps = dcfg.get("eps", None)
    eps = float(assumed_ratio if eps is None else eps)
    k = n_removed(len(scores), eps, float(dcfg.get("removal_factor", 1.5)))
    flagged = np.zeros(len(scores), dtype=bool)
    flagged[np.argsort(-scores, kind="stable")[:k]] = True
    return DetectorOutput(scores, flagged, {"n_flagged": float(k)})


@DEFENSES.register("ss")
def ss(exp, cfg) -> list[dict]:
    return run_pool_detector(exp, cfg, detect_ss)
