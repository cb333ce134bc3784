"""Subspace Reconstruction (Javaheripi et al.; ML-MMDR §3.3, §6.1): fit PCA on clean reserve
features of the target class, keep the smallest k restoring ≥ `energy` of their variance, and score
each pool sample by its ℓ2 reconstruction error. SR has no threshold of its own: the evaluator
reports F1 at the best threshold (max-F1), as the paper does."""
from __future__ import annotations

from typing import Any

import numpy as np

from bdexp.defenses import DEFENSES
from bdexp.defenses.screening import DetectorOutput, SkipPool, run_pool_detector

_CHUNK = 256  # pool rows per float64 block in reconstruction_error


def energy_rank(explained_variance_ratio: np.ndarray, energy: float) -> int:
    """The smallest k with sum(ratio[:k]) ≥ energy (0 when there is no variance to restore)."""
    ratio = np.asarray(explained_variance_ratio, dtype=np.float64)
    if len(ratio) == 0 or not np.all(np.isfinite(ratio)) or ratio.sum() <= 0:
        return 0
    cum = np.cumsum(ratio)
    return int(min(np.searchsorted(cum, float(energy) - 1e-12) + 1, len(ratio)))  # tolerance for fp sums


def fit_subspace(reserve: np.ndarray, energy: float) -> tuple[np.ndarray, np.ndarray]:
    """(mean (d,), components (k, d) with orthonormal rows) of the PCA subspace restoring `energy`.

    PCA through the smaller of the m×m Gram and d×d covariance eigenproblems: a full SVD of
    200 × 65 536 s1 features takes ~30 s on 2 cores, the Gram route well under a second."""
    xc = np.asarray(reserve, dtype=np.float64)
    mean = xc.mean(0)
    xc = xc - mean
    gram = xc.shape[0] <= xc.shape[1]
    vals, vecs = np.linalg.eigh(xc @ xc.T if gram else xc.T @ xc)
    vals, vecs = np.clip(vals[::-1], 0.0, None), vecs[:, ::-1]  # descending variances (×(m−1))
    total = vals.sum()
    if total <= 0:  # identical rows: a point, no directions
        return mean, np.zeros((0, xc.shape[1]))
    k = energy_rank(vals / total, energy)
    k = min(k, int((vals > 1e-12 * vals[0]).sum()))  # never a numerically-zero direction
    comps = (xc.T @ vecs[:, :k]) / np.sqrt(vals[:k]) if gram else vecs[:, :k]
    return mean, np.ascontiguousarray(comps.T)


def reconstruction_error(x: np.ndarray, mean: np.ndarray, components: np.ndarray) -> np.ndarray:
    """‖(x − μ) − (x − μ)VᵀV‖₂ per row: what the subspace cannot restore."""
    out = np.empty(len(x))
    for i in range(0, len(x), _CHUNK):  # float64 in row chunks: wide s1 maps stay within memory
        xc = np.asarray(x[i:i + _CHUNK], dtype=np.float64) - mean
        out[i:i + _CHUNK] = np.linalg.norm(xc - (xc @ components.T) @ components, axis=1)
    return out


def detect_sr(features: np.ndarray, reserve: np.ndarray, dcfg: Any, *, assumed_ratio: float,
              rng: np.random.Generator) -> DetectorOutput:
    """Scores only (flagged=None): the evaluator takes max-F1 (ML-MMDR §6.1)."""
    reserve = reserve[: int(dcfg.get("reserve_size", 200))]  # 200 validated samples (ML-MMDR §6.1)
    if len(reserve) < 2:
        raise SkipPool(f"SR needs at least 2 clean reserve images of the target class, has {len(reserve)} "
                       "(raise screening.reserve_per_class)")
    mean, comps = fit_subspace(reserve, float(dcfg.get("energy", 0.9)))
    scores = reconstruction_error(features, mean, comps)
    return DetectorOutput(scores, None, {"k": float(len(comps)), "n_reserve": float(len(reserve))},
                          {"rule": "max-F1"})


@DEFENSES.register("sr")
def sr(exp, cfg) -> list[dict]:
    return run_pool_detector(exp, cfg, detect_sr)
