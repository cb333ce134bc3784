"""Subspace Reconstruction (Javaheripi et al.; ML-MMDR §3.3, §6.1): fit PCA on clean reserve
features of the target class, keep the smallest k restoring ≥ `energy` of their variance, and score
each pool sample by its ℓ2 reconstruction error. SR has no threshold of its own: the evaluator
reports F1 at the best threshold (max-F1), as the paper does."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from bdexp.defenses import DEFENSES
from bdexp.defenses.contexts import Kind
from bdexp.defenses.screening import DetectorOutput, SkipPool
from bdexp.defenses.subspace import principal_axes
from bdexp.options import Options, option


@dataclass(frozen=True)
class SROptions(Options):
    """conf/defense/sr.yaml explains each value."""

    reserve_size: int = option(200, lo=2)  # clean target-class images the subspace is fitted on (ML-MMDR §6.1)
    energy: float = option(0.9, lo=0, hi=1, lo_open=True)  # variance the subspace restores

_CHUNK = 256  # pool rows per float64 block in reconstruction_error


def energy_rank(explained_variance_ratio: np.ndarray, energy: float) -> int:
    """The smallest k with sum(ratio[:k]) ≥ energy (0 when there is no variance to restore)."""
    ratio = np.asarray(explained_variance_ratio, dtype=np.float64)
    if len(ratio) == 0 or not np.all(np.isfinite(ratio)) or ratio.sum() <= 0:
        return 0
    cum = np.cumsum(ratio)
    return int(min(np.searchsorted(cum, float(energy) - 1e-12) + 1, len(ratio)))  # tolerance for fp sums


def fit_subspace(reserve: np.ndarray, energy: float) -> tuple[np.ndarray, np.ndarray]:
    """(mean (d,), components (k, d) with orthonormal rows) of the PCA subspace restoring `energy`."""
    ax = principal_axes(reserve, rank_tol=1e-12)  # never a numerically-zero direction
    total = float(np.clip(ax.variances, 0.0, None).sum())
    if total <= 0:  # identical rows: a point, no directions
        return ax.mean, np.zeros((0, np.asarray(reserve).shape[1]))
    k = energy_rank(ax.variances / total, energy)
    return ax.mean, np.ascontiguousarray(ax.axes[:k])


def reconstruction_error(x: np.ndarray, mean: np.ndarray, components: np.ndarray) -> np.ndarray:
    """‖(x − μ) − (x − μ)VᵀV‖₂ per row: what the subspace cannot restore."""
    out = np.empty(len(x))
    for i in range(0, len(x), _CHUNK):  # float64 in row chunks: wide s1 maps stay within memory
        xc = np.asarray(x[i:i + _CHUNK], dtype=np.float64) - mean
        out[i:i + _CHUNK] = np.linalg.norm(xc - (xc @ components.T) @ components, axis=1)
    return out


@DEFENSES.register("sr", options=SROptions, kind=Kind.pool_detector)
def detect_sr(features: np.ndarray, reserve: np.ndarray, opts: SROptions, *, assumed_ratio: float,
              rng: np.random.Generator) -> DetectorOutput:
    """Scores only (flagged=None): the evaluator takes max-F1 (ML-MMDR §6.1)."""
    opts = SROptions.of(opts)
    reserve = reserve[: opts.reserve_size]  # 200 validated samples (ML-MMDR §6.1)
    if len(reserve) < 2:
        raise SkipPool(f"SR needs at least 2 clean reserve images of the target class, has {len(reserve)} "
                       "(raise screening.reserve_per_class)")
    mean, comps = fit_subspace(reserve, opts.energy)
    scores = reconstruction_error(features, mean, comps)
    return DetectorOutput(scores, None, {"k": float(len(comps)), "n_reserve": float(len(reserve))},
                          {"rule": "max-F1"})

