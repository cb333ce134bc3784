"""Activation Clustering (Chen et al. 2018, arXiv:1811.03728; ML-MMDR §3.3 and §6.1): reduce a
pool's features with FastICA, split them with 2-means, decide which cluster is malicious.

ML-MMDR §6.1 reduces to "vectors of length 20" and clusters with k-means; §3.3 lists the ways AC
decides which cluster is malicious: "exclusionary reclassification, relative size comparison, or
silhouette score". On the screening pools half of the settings are balanced (r′ = 1.0: N benign +
N malicious), where the two clusters have the same size and "the smaller cluster" is a coin flip,
while the paper reports AC F1 0.978 / 0.991 / 0.948 at N = 100, r′ = 1.0 (§6.1). The defender of
this protocol holds clean target-class images (the reserve SR fits its subspace on, §6.1), so the
default decision (`criterion: reserve`) uses them: the cluster whose mean feature lies farther
from the reserve's mean feature is malicious. It works at every r′. The other rules are options:
  size        the smaller cluster (relative size; IBM ART's `cluster_analysis="smaller"`), with
              `max_size_fraction` (flag it only when it holds at most that share of the pool;
              ART's size threshold is 0.35). A coin flip at r′ = 1.
  silhouette  the smaller cluster, flagged only when the 2-means silhouette score reaches
              `silhouette_threshold` (a clean pool forms no two clusters). A coin flip at r′ = 1.
Exclusionary reclassification needs retraining without each cluster; a pool detector only has
features, so it is not offered here. `reduce: pca` replaces FastICA by the unwhitened top principal
scores, the default of IBM ART's ActivationDefence (v1.6.2: nb_dims 10, reduce "PCA", cluster_analysis
"smaller"), which ISPL App. C runs as its AC baseline.

Note: unit-variance ICA sources are an orthogonal rotation of the PCA-whitened data, and k-means
is rotation invariant, so the partition equals 2-means on the whitened top-k principal scores;
ICA is kept for fidelity (and for anyone who inspects the components).
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch
from sklearn.cluster import KMeans
from sklearn.decomposition import FastICA
from sklearn.exceptions import ConvergenceWarning
from sklearn.metrics import silhouette_score

from bdexp.defenses import DEFENSES
from bdexp.defenses.contexts import Kind
from bdexp.defenses.screening import DetectorOutput, SkipPool
from bdexp.defenses.subspace import principal_axes
from bdexp.options import Options, option


@dataclass(frozen=True)
class ACOptions(Options):
    """conf/defense/ac.yaml explains each value."""

    n_components: int = option(10, lo=1)  # ICA dims (Chen et al.; ML-MMDR §6.1 uses 20)
    reduce: Literal["fastica", "pca"] = "fastica"
    max_iter: int = option(200, lo=1)  # FastICA iterations (scikit-learn's default)
    n_init: int = option(100, lo=1)  # k-means restarts
    criterion: Literal["reserve", "size", "silhouette"] = "reserve"
    silhouette_threshold: float = option(0.15, lo=-1, hi=1)
    max_size_fraction: float | None = option(None, lo=0, hi=1)
    min_samples_per_component: int = option(10, lo=1)


def principal_scores(x: np.ndarray, k: int) -> np.ndarray:
    """The top-k principal-component scores of `x` (n, d), k cut to the numerical rank.

    FastICA's own whitening is exactly this projection; doing it here first keeps ICA cheap on
    wide feature maps (n ≤ 1000 pool rows vs. d up to ~10⁵) and drops degenerate directions that
    whitening would blow up to unit variance."""
    return principal_axes(x, k).scores


def malicious_cluster(features: np.ndarray, labels: np.ndarray, reserve: np.ndarray | None,
                      criterion: str) -> int:
    """Which of the two clusters (0 or 1) the rule `criterion` (one of CRITERIA) calls malicious."""
    sizes = np.bincount(labels, minlength=2)
    if criterion != "reserve":
        return int(np.argmin(sizes))  # ties (balanced pools) go to cluster 0: the coin flip
    if reserve is None or len(reserve) == 0:
        raise SkipPool("ac.criterion=reserve needs clean reserve images of the target class "
                       "(raise screening.reserve_per_class, or set defense.ac.criterion=size)")
    centre = np.asarray(reserve, dtype=np.float64).mean(0)
    far = [np.linalg.norm(np.asarray(features[labels == c], dtype=np.float64).mean(0) - centre)
           if sizes[c] else -np.inf for c in (0, 1)]
    return int(np.argmax(far))


@DEFENSES.register("ac", options=ACOptions, kind=Kind.pool_detector)
def detect_ac(features: np.ndarray, reserve: np.ndarray | None, opts: ACOptions, *, assumed_ratio: float,
              rng: np.random.Generator) -> DetectorOutput:
    """Flag one of two k-means clusters in ICA space, chosen by `criterion`. Scores (for AUROC):
    distance to the benign cluster's centre minus distance to the malicious one's. Uses no assumed
    ratio (AC needs no estimate of the poison rate, ML-MMDR §3.3); the reserve only with
    `criterion: reserve`."""
    opts = ACOptions.of(opts)
    n, d = features.shape
    criterion = opts.criterion
    tags = {"rule": criterion, "reduce": opts.reduce}
    # Reduce to what the pool supports. Whitening n−1 dims of n points maps them onto a regular
    # simplex (all pairwise distances equal) and k-means splits at random, so we also keep
    # ≥ `min_samples_per_component` rows per ICA dim (see ac.yaml for the measured reason).
    k = min(opts.n_components, d, n - 1, max(n // opts.min_samples_per_component, 1))
    z = principal_scores(features, k) if k >= 1 else np.zeros((n, 0))
    if z.shape[1] == 0:  # all rows identical: nothing to separate
        return DetectorOutput(np.zeros(n), np.zeros(n, dtype=bool), tags=tags)
    seed = int(rng.integers(2**31 - 1))
    if opts.reduce == "fastica":  # ML-MMDR §6.1 / Chen et al.; "pca" keeps the unwhitened scores (IBM ART's default)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ConvergenceWarning)
            z = FastICA(n_components=z.shape[1], whiten="unit-variance", max_iter=opts.max_iter,
                        random_state=seed).fit_transform(z)
    km = KMeans(n_clusters=2, n_init=opts.n_init, random_state=seed).fit(z)
    labels = km.labels_
    sizes = np.bincount(labels, minlength=2)
    bad = malicious_cluster(features, labels, reserve, criterion)
    dist = np.linalg.norm(z[:, None, :] - km.cluster_centers_[None], axis=2)  # (n, 2)
    scores = dist[:, 1 - bad] - dist[:, bad]
    flag = True
    extra: dict[str, float] = {"flagged_cluster_fraction": float(sizes[bad] / n), "ica_dims": float(z.shape[1])}
    if sizes.min() > 0 and n >= 3:
        extra["silhouette"] = float(silhouette_score(z, labels))
    if criterion == "silhouette":
        flag = extra.get("silhouette", -1.0) >= opts.silhouette_threshold
    max_frac = opts.max_size_fraction
    if max_frac is not None and sizes[bad] / n > max_frac:
        flag = False
    flagged = (labels == bad) & flag
    return DetectorOutput(scores, flagged, extra, tags)

