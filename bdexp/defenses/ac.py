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

Why the result depends on neither the pool's row order nor the seed (docs/defenses.md has the numbers):
  The unmixing. FastICA whitens the principal scores and rotates them by an unmixing W that
  scikit-learn's parallel FastICA (its default `algorithm="parallel"`, `whiten="unit-variance"`)
  keeps orthogonal after every fixed-point step by symmetric decorrelation W <- (WWᵀ)^(-1/2) W
  (Hyvärinen & Oja 2000, Neural Networks 13, §6.2). Converged or not, unit-variance sources are then
  an orthogonal rotation of the whitened scores, and 2-means, whose inertia is rotation invariant,
  has the same optimum on both. If an update is numerically singular (scikit-learn clips the
  eigenvalues of WWᵀ at the smallest float) the decorrelation fails: rows of W collapse onto one
  direction and two or more sources come out identical. The reduction is then no rotation at all,
  and k-means splits a copied source. `ica_sources` detects it from what FastICA returns (the largest
  |correlation| between two sources, ~1e-15 for a sound unmixing, ~1 for a collapsed one, or an
  overflow) and clusters the whitened scores instead, the space any sound unmixing rotates. Other
  FastICA settings (`algorithm="deflation"`, `fun`, `tol`, `max_iter`, `w_init`; scikit-learn's
  FastICA docs) change only which rotation comes out, never the 2-means optimum, so they are left at
  scikit-learn's defaults. Recorded: `ica_degenerate`, `ica_max_source_corr`, `ica_iterations`.
  The clustering. Lloyd's algorithm from k-means++ seeds (Arthur & Vassilvitskii 2007) ends in a
  local minimum of the inertia. In k whitened dims the two halves of a separable pool sit about ±1
  apart on one axis while every row carries √(k−1) units of noise on the others, so the first
  assignment from two seed rows is decided by noise: at 20 dims, 100 restarts end in a noise split
  even where the planted split has the lower inertia. `two_means` therefore also starts Lloyd from
  the best 1-D 2-means split of every reduced dim, the principal axes and the independent
  components (deterministic axis-split seeding: Su & Dy 2007, "In search of deterministic methods
  for initializing K-means and Gaussian mixture clustering", Intell. Data Anal. 11(4); ICA's
  non-Gaussian directions are where clusters show as bimodal projections, Hyvärinen & Oja 2000 §4.5),
  and keeps the lowest inertia; a k-means++ restart wins only when strictly lower. The starts do not
  depend on the row order or the seed. Recorded: `kmeans_pp_excess_inertia`, how much higher the
  best restart's inertia was (relative; 0 when the restarts found the winner).
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Literal

import numpy as np
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


SOURCE_CORR_TOL = 1e-6  # a sound unmixing gives ≤ 1e-12 (float64 roundoff), a degenerate one ≈ 1
INERTIA_RTOL = 1e-9  # a k-means++ restart replaces a split start only when its inertia is lower by more


def whitened(z: np.ndarray) -> np.ndarray:
    """`z` centred with every column at unit variance: for principal scores (uncorrelated columns)
    the whitened scores, the space FastICA's unit-variance sources are a rotation of."""
    zc = z - z.mean(0)
    return zc / zc.std(0)


def max_source_corr(s: np.ndarray) -> float:
    """The largest |correlation| between two columns of `s`: 0 for uncorrelated columns (one column
    included), 1 for two identical ones, nan when a column is constant or not finite."""
    if s.shape[1] < 2:
        return 0.0
    if not np.all(np.isfinite(s)):
        return float("nan")
    with np.errstate(invalid="ignore", divide="ignore"):
        corr = np.corrcoef(s, rowvar=False)
    return float(np.abs(corr - np.eye(len(corr))).max())


def ica_sources(z: np.ndarray, max_iter: int, seed: int) -> tuple[np.ndarray, dict[str, float]]:
    """FastICA's unit-variance sources of the principal scores `z`, or, when the unmixing is
    degenerate (sources not uncorrelated: the module docstring says why), the whitened scores those
    sources would have been a rotation of. Diagnostics: `ica_degenerate` (0/1), `ica_iterations`
    (= max_iter when FastICA did not converge) and `ica_max_source_corr`."""
    try:
        with warnings.catch_warnings(), np.errstate(over="ignore", invalid="ignore"):
            warnings.simplefilter("ignore", ConvergenceWarning)
            ica = FastICA(n_components=z.shape[1], whiten="unit-variance", max_iter=max_iter, random_state=seed)
            s = ica.fit_transform(z)
        corr, iterations = max_source_corr(s), ica.n_iter_
    except (ValueError, np.linalg.LinAlgError):  # an unmixing that overflowed stops scipy's eigh
        corr, iterations = float("nan"), max_iter
    degenerate = not corr <= SOURCE_CORR_TOL  # nan included
    diag = {"ica_degenerate": float(degenerate), "ica_iterations": float(iterations)}
    if np.isfinite(corr):
        diag["ica_max_source_corr"] = corr
    return (whitened(z) if degenerate else s), diag


def best_split(v: np.ndarray) -> np.ndarray:
    """The 2-means partition (0/1 labels) of the values `v`: exact in one dimension, the best of the
    n − 1 cuts of the sorted values."""
    order = np.argsort(v, kind="stable")
    s = np.asarray(v, dtype=np.float64)[order]
    s = s - s.mean()
    n = len(s)
    left = np.arange(1, n)  # rows left of each cut
    c1, c2 = np.cumsum(s)[:-1], np.cumsum(s * s)[:-1]
    sse = c2 - c1**2 / left + (s @ s - c2) - (s.sum() - c1) ** 2 / (n - left)
    labels = np.zeros(n, dtype=np.int64)
    labels[order[int(np.argmin(sse)) + 1:]] = 1
    return labels


def split_starts(z: np.ndarray) -> list[np.ndarray]:
    """One start partition per column of `z`: its best 1-D split (`best_split`)."""
    return [best_split(z[:, j]) for j in range(z.shape[1])]


def unique_partitions(partitions: list[np.ndarray]) -> list[np.ndarray]:
    """`partitions` (0/1 labels) without repeats, a partition and its relabelling counting as one."""
    seen: dict[bytes, np.ndarray] = {}
    for labels in partitions:
        seen.setdefault((labels if labels[0] == 0 else 1 - labels).tobytes(), labels)
    return list(seen.values())


def two_means(z: np.ndarray, starts: list[np.ndarray], n_init: int, seed: int) -> tuple[KMeans, float]:
    """2-means of `z`: Lloyd's algorithm from the centres of every partition in `starts` and from
    `n_init` k-means++ seedings; the lowest inertia wins, a k-means++ one only when lower by more than
    INERTIA_RTOL (so the result depends on the seed only where the restarts beat every start). Also
    returns the k-means++ restarts' relative excess inertia over the winner (0 when they found it)."""
    best = None
    for labels in unique_partitions(starts):
        centres = np.stack([z[labels == c].mean(0) for c in (0, 1)])
        km = KMeans(n_clusters=2, init=centres, n_init=1).fit(z)
        if best is None or km.inertia_ < best.inertia_:
            best = km
    restarts = KMeans(n_clusters=2, n_init=n_init, random_state=seed).fit(z)
    if best is None or restarts.inertia_ < best.inertia_ * (1 - INERTIA_RTOL):
        best = restarts
    excess = (restarts.inertia_ - best.inertia_) / best.inertia_ if best.inertia_ > 0 else 0.0
    return best, max(float(excess), 0.0)


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
    extra: dict[str, float] = {}
    starts = split_starts(z)  # the reduced dims themselves: principal axes (whitened or not, the same splits)
    if opts.reduce == "fastica":  # ML-MMDR §6.1 / Chen et al.; "pca" keeps the unwhitened scores (IBM ART's default)
        z, extra = ica_sources(z, opts.max_iter, seed)
        if not extra["ica_degenerate"]:
            starts += split_starts(z)  # and the independent components
    km, extra["kmeans_pp_excess_inertia"] = two_means(z, starts, opts.n_init, seed)
    labels = km.labels_
    sizes = np.bincount(labels, minlength=2)
    bad = malicious_cluster(features, labels, reserve, criterion)
    dist = np.linalg.norm(z[:, None, :] - km.cluster_centers_[None], axis=2)  # (n, 2)
    scores = dist[:, 1 - bad] - dist[:, bad]
    flag = True
    extra.update(flagged_cluster_fraction=float(sizes[bad] / n), ica_dims=float(z.shape[1]))
    if sizes.min() > 0 and n >= 3:
        extra["silhouette"] = float(silhouette_score(z, labels))
    if criterion == "silhouette":
        flag = extra.get("silhouette", -1.0) >= opts.silhouette_threshold
    max_frac = opts.max_size_fraction
    if max_frac is not None and sizes[bad] / n > max_frac:
        flag = False
    flagged = (labels == bad) & flag
    return DetectorOutput(scores, flagged, extra, tags)

