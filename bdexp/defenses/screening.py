"""The test-time screening protocol shared by the pool detectors AC, SS and SR
(ML-MMDR §6.1) — the evaluator side.

A pool (N, r′) is N benign test images the model predicts as the target t plus round(r′·N)
triggered test images it predicts as t (r′ = malicious : benign). Pools are drawn once per run
(`screening_pools`, memoized in ``exp.info["screening_pools"]``) so every detector sees the very
same images and features. `run_pool_detector` hands a detector only the pool's features and the
clean reserve of the target class, never which rows are malicious, and scores what it returns.
"""
from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np
import torch

from bdexp import metrics
from bdexp.attacks import has_backdoor
from bdexp.results import record

log = logging.getLogger(__name__)

INFO_KEY = "screening_pools"


class SkipPool(Exception):
    """Raised by a detector that cannot run on a pool (e.g. SR without a reserve); the evaluator
    logs a warning and records `skipped` instead of metrics."""


@dataclass
class DetectorOutput:
    scores: np.ndarray  # (n,) suspicion, higher = more likely malicious
    flagged: np.ndarray | None  # (n,) bool decision; None = no own rule (evaluator takes max-F1)
    extra: dict[str, float] = field(default_factory=dict)  # diagnostics recorded as extra metrics
    tags: dict[str, str] = field(default_factory=dict)  # the decision rule used, tagged on every record


class Detector(Protocol):
    def __call__(self, features: np.ndarray, reserve: np.ndarray, opts: Any, *, assumed_ratio: float,
                 rng: np.random.Generator) -> DetectorOutput: ...


@dataclass
class Pool:
    n_requested: int  # N as configured (the record tag)
    ratio: float  # r′ as configured (the record tag)
    n_benign: int  # actual counts (fewer when fewer candidates exist)
    n_malicious: int
    rows: np.ndarray  # rows of ScreeningPools.features, in a seeded shuffled order
    labels: np.ndarray  # 1 = malicious, aligned with rows (evaluator only)


@dataclass
class ScreeningPools:
    target: int
    levels: tuple[str, ...]
    benign_index: np.ndarray  # test-set positions of the drawn benign images (feature rows 0..B-1)
    malicious_index: np.ndarray  # backdoor-test-set positions of the drawn malicious images (rows B..)
    n_benign_available: int
    n_malicious_available: int
    features: dict[str, np.ndarray]  # level -> (B + M, d) float32, read-only
    reserve: dict[str, np.ndarray]  # level -> (m, d) float32, clean reserve images of class t
    pools: list[Pool]
    skip_reason: str | None = None  # set when no pool can be built (attack `none`, ...)


def _round_half_up(x: float) -> int:
    """round(r′·N) of ML-MMDR §6.1, halves up (Python's round() would send 2.5 to 2)."""
    return int(math.floor(x + 0.5 + 1e-9))


def pool_counts(n_requested: int, ratio: float, n_benign_available: int, n_malicious_available: int) -> tuple[int, int]:
    """(n_benign, n_malicious) of pool (N, r′): the first N benign, fewer if fewer exist, plus
    round(r′·n_benign) malicious, fewer if fewer exist (ML-MMDR §6.1)."""
    n_b = min(int(n_requested), n_benign_available)
    n_m = min(_round_half_up(float(ratio) * n_b), n_malicious_available)
    return n_b, n_m


def _readonly(a: np.ndarray) -> np.ndarray:
    a.flags.writeable = False
    return a


def screening_pools(exp) -> ScreeningPools:
    """The run's screening pools and their features, computed once and memoized in `exp.info`."""
    if INFO_KEY in exp.info:
        return exp.info[INFO_KEY]
    start = time.perf_counter()
    scfg = exp.cfg.screening
    levels = tuple(str(lv) for lv in scfg.levels)
    t = exp.target
    rng = exp.rng("screening")
    reserve_set = set(exp.reserve_index.tolist())

    screen = exp.screen_index.numpy()
    benign = screen[exp.pred_test.numpy()[screen] == t]
    bd = exp.backdoor_test
    skip = None
    if not has_backdoor(exp.attack) or len(bd.y_target) == 0:
        skip = f"attack {exp.cfg.attack.name!r} has no backdoor test set"
        malicious = np.zeros(0, dtype=np.int64)
    else:
        # triggered images aimed at t and predicted as t whose clean original is not in the reserve
        ok = (exp.pred_backdoor.numpy() == t) & (bd.y_target.numpy() == t)
        ok &= np.array([int(i) not in reserve_set for i in bd.index.tolist()], dtype=bool)
        malicious = np.flatnonzero(ok)
    benign = rng.permutation(benign)  # one seeded order each; pool(N, r′) takes prefixes
    malicious = rng.permutation(malicious)
    n_b_avail, n_m_avail = len(benign), len(malicious)

    specs = [(int(n), float(r)) for n in scfg.sizes for r in scfg.ratios]
    counts = [pool_counts(n, r, n_b_avail, n_m_avail) for n, r in specs]
    n_b_max = max((b for b, _ in counts), default=0)
    n_m_max = max((m for _, m in counts), default=0)
    benign, malicious = benign[:n_b_max], malicious[:n_m_max]

    pools: list[Pool] = []
    for (n, r), (n_b, n_m) in zip(specs, counts):
        rows = np.concatenate([np.arange(n_b), n_b_max + np.arange(n_m)]).astype(np.int64)
        labels = np.concatenate([np.zeros(n_b, np.int64), np.ones(n_m, np.int64)])
        order = exp.rng(f"screening/order/{n}/{r}").permutation(len(rows))  # no position leaks the label
        pools.append(Pool(n, r, n_b, n_m, rows[order], labels[order]))

    reserve_idx = exp.reserve_index.numpy()
    reserve_idx = reserve_idx[exp.data.y_test.numpy()[reserve_idx] == t]  # true class t (SR, ML-MMDR §6.1)
    # one forward pass over pool images (benign rows, then malicious rows) and the reserve
    x = torch.cat([exp.data.x_test[torch.as_tensor(benign, dtype=torch.long)],
                   bd.x[torch.as_tensor(malicious, dtype=torch.long)],
                   exp.data.x_test[torch.as_tensor(reserve_idx, dtype=torch.long)]])
    features: dict[str, np.ndarray] = {}
    reserve: dict[str, np.ndarray] = {}
    if len(x) and skip is None:
        _, feats = exp.features(x, levels)
        for lv in levels:
            f = feats[lv].numpy().astype(np.float32, copy=False)
            features[lv] = _readonly(np.ascontiguousarray(f[: n_b_max + n_m_max]))
            reserve[lv] = _readonly(np.ascontiguousarray(f[n_b_max + n_m_max:]))
    log.info("screening pools (target %d): %d benign / %d malicious candidates, %d reserve images of "
             "the target; pools %s; features in %.2f s", t, n_b_avail, n_m_avail, len(reserve_idx),
             ", ".join(f"N={p.n_requested} r'={p.ratio}: {p.n_benign}+{p.n_malicious}" for p in pools),
             time.perf_counter() - start)
    out = ScreeningPools(t, levels, benign, malicious, n_b_avail, n_m_avail, features, reserve, pools, skip)
    exp.info[INFO_KEY] = out
    return out


def _skipped(level: str, pool: Pool, why: str, skips: dict[str, list[str]]) -> dict:
    """The `skipped` record of one level x pool; the reason is collected in `skips` (reason -> the
    pools it hit) and logged once per reason by `_warn_skipped`."""
    skips.setdefault(why, []).append(f"{level} N={pool.n_requested} r'={pool.ratio:g}")
    return record("skipped", 1.0, level=level, N=pool.n_requested, r=pool.ratio)


def _warn_skipped(defense: str, skips: dict[str, list[str]], total: int) -> None:
    """One warning per distinct reason with the number of pools it skipped (not one per pool)."""
    for why, pools in skips.items():
        which = f"all {total} pools" if len(pools) == total else f"{len(pools)} of {total} pools ({', '.join(pools)})"
        log.warning("%s: skipped %s: %s", defense, which, why)


def checked_output(labels: np.ndarray, out: DetectorOutput) -> tuple[np.ndarray, np.ndarray | None]:
    """(scores as float64, flags as bool or None) of a detector's output on a pool of `labels`;
    a ValueError when either does not fit the pool or a score is not finite (both protocols)."""
    scores = np.asarray(out.scores, dtype=np.float64)
    if scores.shape != labels.shape or not np.all(np.isfinite(scores)):
        raise ValueError(f"detector returned scores of shape {scores.shape} (finite: "
                         f"{bool(np.all(np.isfinite(scores)))}) for a pool of {len(labels)}")
    if out.flagged is None:
        return scores, None
    flagged = np.asarray(out.flagged, dtype=bool)
    if flagged.shape != labels.shape:
        raise ValueError(f"detector flagged {flagged.shape} for a pool of {len(labels)}")
    return scores, flagged


def score_pool(labels: np.ndarray, out: DetectorOutput) -> dict[str, float]:
    """Precision/recall/F1 from the detector's own decision, or max-F1 over thresholds when it has
    none (SR, ML-MMDR §6.1); `f1_max` (F1 at the best threshold of the scores) and AUROC always,
    so a detector's rule and its scores can be told apart in the tables."""
    scores, flagged = checked_output(labels, out)
    best = {k: v for k, v in metrics.best_f1(labels, scores).items() if k != "threshold"}
    prf = best if flagged is None else metrics.detection_scores(labels, flagged)
    return {**prf, "f1_max": best["f1"], "auroc": metrics.auroc(labels, scores)}


def run_pool_detector(exp, name: str, opts: Any, detect: Detector) -> list[dict]:
    """Run `detect` on every level × pool (N, r′) of ML-MMDR §6.1 and score it (the evaluator side).

    Records per level × pool, tagged ``level``, ``N`` (requested) and ``r`` (r′) and the detector's
    own `tags` (its decision rule): f1, precision, recall (of that rule), f1_max, auroc, n_benign,
    n_malicious and the detector's `extra` diagnostics; or ``skipped``
    = 1.0 when the pool has no malicious/benign images or the detector raised SkipPool."""
    start = time.perf_counter()
    sp = screening_pools(exp)
    rows: list[dict] = []
    skips: dict[str, list[str]] = {}
    ran = 0
    for level in sp.levels:
        for pool in sp.pools:
            tags = dict(level=level, N=pool.n_requested, r=pool.ratio)
            if sp.skip_reason or pool.n_benign == 0 or pool.n_malicious == 0:
                why = sp.skip_reason or f"{pool.n_benign} benign / {pool.n_malicious} malicious images"
                rows.append(_skipped(level, pool, why, skips))
                continue
            feats = sp.features[level][pool.rows]  # a fresh copy: detectors cannot touch the shared arrays
            ratio = pool.ratio / (1.0 + pool.ratio)  # the defender's assumed poison fraction (our choice)
            rng = exp.rng(f"{name}/{level}/{pool.n_requested}/{pool.ratio}")
            try:
                with exp.sealed(name):  # the detector sees the pool's features and the reserve only
                    out = detect(feats, sp.reserve[level], opts, assumed_ratio=ratio, rng=rng)
            except SkipPool as e:
                rows.append(_skipped(level, pool, str(e), skips))
                continue
            ran += 1
            tags = {**tags, **out.tags}
            for metric, value in score_pool(pool.labels, out).items():
                rows.append(record(metric, value, **tags))
            rows.append(record("n_benign", pool.n_benign, **tags))
            rows.append(record("n_malicious", pool.n_malicious, **tags))
            for metric, value in out.extra.items():
                rows.append(record(metric, value, **tags))
    _warn_skipped(name, skips, len(sp.levels) * len(sp.pools))
    if ran:  # with none scored the warning above says it all
        log.info("%s: %d of %d pools scored on levels %s in %.2f s", name, ran, len(sp.levels) * len(sp.pools),
                 ",".join(sp.levels), time.perf_counter() - start)
    return rows
