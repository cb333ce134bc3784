"""Activation Clustering (Chen et al.; SPEC §5.2, ML-MMDR §6.1): reduce a pool's features with
FastICA, split them with 2-means, call the smaller cluster malicious.

ML-MMDR §6.1 uses 20 ICA dims and 2-means; SPEC §5.2 calls the smaller cluster malicious. Original
AC used 10 dims and analysed the clusters by relative size or silhouette score: `n_components`,
`criterion: silhouette` (flag the smaller cluster only when the silhouette score reaches
`silhouette_threshold`) and `max_size_fraction` (flag it only when it holds at most that fraction
of the pool) cover those.

Note: unit-variance ICA sources are an orthogonal rotation of the PCA-whitened data, and k-means
is rotation invariant, so the partition equals 2-means on the whitened top-k principal scores;
ICA is kept for fidelity (and for anyone who inspects the components).
"""
from __future__ import annotations

import warnings
from typing import Any

import numpy as np
import torch
from sklearn.cluster import KMeans
from sklearn.decomposition import FastICA
from sklearn.exceptions import ConvergenceWarning
from sklearn.metrics import silhouette_score

from bdexp.defenses import DEFENSES
from bdexp.defenses.screening import DetectorOutput, run_pool_detector

_RANK_TOL = 1e-6  # eigenvalues below this fraction of the largest count as zero (float32 features)


def principal_scores(x: np.ndarray, k: int) -> np.ndarray:
    """The top-k principal-component scores of `x` (n, d), k cut to the numerical rank.

    FastICA's own whitening is exactly this projection; doing it here first keeps ICA cheap on
    wide feature maps (n ≤ 1000 pool rows vs. d up to ~10⁵) and drops degenerate directions that
    whitening would blow up to unit variance."""
    xt = torch.from_numpy(np.asarray(x, dtype=np.float32))
    xc = xt - xt.mean(0, dtype=torch.float64).float()
    n, d = xc.shape
    if n <= d:  # Gram matrix: Xc = U S Vᵀ, scores = U S
        vals, vecs = torch.linalg.eigh((xc @ xc.T).double())
    else:  # covariance: scores = Xc V
        vals, vecs = torch.linalg.eigh((xc.T @ xc).double())
    vals, vecs = vals.flip(0), vecs.flip(1)  # descending
    rank = int((vals > _RANK_TOL * max(float(vals[0]), 0.0)).sum()) if float(vals[0]) > 0 else 0
    k = min(k, rank)
    if n <= d:
        return (vecs[:, :k] * vals[:k].clamp_min(0).sqrt()).numpy()
    return (xc.double() @ vecs[:, :k]).numpy()


def detect_ac(features: np.ndarray, reserve: np.ndarray, dcfg: Any, *, assumed_ratio: float,
              rng: np.random.Generator) -> DetectorOutput:
    """Flag the smaller of two k-means clusters in ICA space. Scores (for AUROC): distance to the
    larger cluster's centre minus distance to the smaller one's. Uses neither the reserve nor the
    assumed ratio (AC needs no verified data, ML-MMDR §3.3)."""
    n, d = features.shape
    # Reduce to what the pool supports. Whitening n−1 dims of n points maps them onto a regular
    # simplex (all pairwise distances equal) and k-means splits at random, so we also keep
    # ≥ `min_samples_per_component` (5) rows per ICA dim; at the paper's pool sizes (n ≥ 110,
    # SPEC §5.1) this never binds and the 20 dims of ML-MMDR §6.1 stand.
    per = max(int(dcfg.get("min_samples_per_component", 5)), 1)
    k = min(int(dcfg.get("n_components", 20)), d, n - 1, max(n // per, 1))
    z = principal_scores(features, k) if k >= 1 else np.zeros((n, 0))
    if z.shape[1] == 0:  # all rows identical: nothing to separate
        return DetectorOutput(np.zeros(n), np.zeros(n, dtype=bool))
    seed = int(rng.integers(2**31 - 1))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        z = FastICA(n_components=z.shape[1], whiten="unit-variance", max_iter=int(dcfg.get("max_iter", 200)),
                    random_state=seed).fit_transform(z)
    km = KMeans(n_clusters=2, n_init=int(dcfg.get("n_init", 10)), random_state=seed).fit(z)
    labels = km.labels_
    sizes = np.bincount(labels, minlength=2)
    small = int(np.argmin(sizes))
    dist = np.linalg.norm(z[:, None, :] - km.cluster_centers_[None], axis=2)  # (n, 2)
    scores = dist[:, 1 - small] - dist[:, small]
    flag = True
    extra: dict[str, float] = {}
    if sizes.min() > 0 and n >= 3:
        extra["silhouette"] = float(silhouette_score(z, labels))
    criterion = str(dcfg.get("criterion", "size"))
    if criterion == "silhouette":
        flag = extra.get("silhouette", -1.0) >= float(dcfg.get("silhouette_threshold", 0.15))
    elif criterion != "size":
        raise ValueError(f"ac.criterion must be size or silhouette, got {criterion!r}")
    max_frac = dcfg.get("max_size_fraction", None)
    if max_frac is not None and sizes[small] / n > float(max_frac):
        flag = False
    flagged = (labels == small) & flag
    return DetectorOutput(scores, flagged, extra)


@DEFENSES.register("ac")
def ac(exp, cfg) -> list[dict]:
    return run_pool_detector(exp, cfg, detect_ac)
