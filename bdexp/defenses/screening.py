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
import pickle
import time
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np
import torch

from bdexp import metrics
from bdexp.attacks import has_backdoor
from bdexp.defenses.contexts import Kind, register_kind, sealed_call
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
    n_requested: int  # N as configured (with `ratio`, it seeds the pool's order and the detector's rng)
    ratio: float  # r′ as configured
    n_benign: int  # actual counts (fewer when fewer candidates exist)
    n_malicious: int
    rows: np.ndarray  # rows of ScreeningPools.features, in a seeded shuffled order
    labels: np.ndarray  # 1 = malicious, aligned with rows (evaluator only)

    @property
    def tags(self) -> dict:
        """What the pool holds, as its records are tagged: N = its benign images (the configured N,
        or fewer when fewer benign images are predicted as the target), r = the configured r′, or
        the ratio it holds when fewer triggered images exist than round(r′·N)."""
        full = self.n_malicious == _round_half_up(self.ratio * self.n_benign)
        held = self.ratio if full or self.n_benign == 0 else round(self.n_malicious / self.n_benign, 4)
        return {"N": self.n_benign, "r": held}


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

    def __setstate__(self, state: dict) -> None:
        """Read-only again after the run was sealed and opened (Experiment.sealed pickles it): a
        detector must not change the features every detector shares."""
        self.__dict__.update(state)
        for arrays in (self.features, self.reserve):
            for a in arrays.values():
                _readonly(a)


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

    specs, counts, merged = [], [], {}
    for n, r in ((int(n), float(r)) for n in scfg.sizes for r in scfg.ratios):
        held = pool_counts(n, r, n_b_avail, n_m_avail)
        merged.setdefault(held, []).append((n, r))
        if len(merged[held]) == 1:  # else the same images as an earlier (N, r′): one pool
            specs.append((n, r))
            counts.append(held)
    n_b_max = max((b for b, _ in counts), default=0)
    n_m_max = max((m for _, m in counts), default=0)
    benign, malicious = benign[:n_b_max], malicious[:n_m_max]

    pools: list[Pool] = []
    for (n, r), (n_b, n_m) in zip(specs, counts):
        rows = np.concatenate([np.arange(n_b), n_b_max + np.arange(n_m)]).astype(np.int64)
        labels = np.concatenate([np.zeros(n_b, np.int64), np.ones(n_m, np.int64)])
        # no position leaks the label, nor can a defender who knows the seed recompute the order
        order = exp.truth_rng(f"screening/order/{n}/{r}", benign[:n_b], malicious[:n_m]).permutation(len(rows))
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
             ", ".join(f"N={p.n_requested} r'={p.ratio:g}: {p.n_benign}+{p.n_malicious}" for p in pools),
             time.perf_counter() - start)
    for pool in pools if skip is None else []:  # say where the configured sizes are not what the pools hold
        asked = merged[(pool.n_benign, pool.n_malicious)]
        if len(asked) > 1 or pool.tags != {"N": pool.n_requested, "r": pool.ratio}:
            log.warning("screening: %s %s %d benign + %d triggered images (only %d benign / %d triggered are "
                        "predicted as the target %d): one pool, recorded as N=%d r'=%g",
                        " and ".join(f"N={n} r'={r:g}" for n, r in asked), "hold" if len(asked) > 1 else "holds",
                        pool.n_benign, pool.n_malicious, n_b_avail, n_m_avail, t, pool.tags["N"], pool.tags["r"])
    out = ScreeningPools(t, levels, benign, malicious, n_b_avail, n_m_avail, features, reserve, pools, skip)
    exp.info[INFO_KEY] = out
    return out


def _skipped(tags: dict, why: str, skips: dict[str, list[str]]) -> dict:
    """The `skipped` record of one level x pool (its `tags`); the reason is collected in `skips`
    (reason -> the pools it hit) and logged once per reason by `_warn_skipped`."""
    skips.setdefault(why, []).append(f"{tags['level']} N={tags['N']} r'={tags['r']:g}")
    return record("skipped", 1.0, **tags)


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


@dataclass(frozen=True)
class PoolJob:
    """What one detector call on one level x pool gets besides the level's reserve, and nothing more:
    no label, no row index, no other pool (ML-MMDR's pools are prefixes of each other, so two
    pools' rows in the clear would give labels away by difference)."""

    tags: dict  # level, N, r (Pool.tags)
    features: np.ndarray | None  # the pool's features, a fresh copy in the pool's order
    assumed_ratio: float
    rng: np.random.Generator
    skip: str | None = None  # why the pool cannot be screened (no backdoor, no benign/malicious images)


def pool_job(exp, name: str, level: str, i: int) -> PoolJob:
    """Pool `i` of the run at `level`, as detector `name` gets it."""
    sp = screening_pools(exp)
    pool = sp.pools[i]
    tags = dict(level=level, **pool.tags)
    ratio = pool.ratio / (1.0 + pool.ratio)  # the defender's assumed poison fraction (our choice)
    rng = exp.rng(f"{name}/{level}/{pool.n_requested}/{pool.ratio}")
    if sp.skip_reason or pool.n_benign == 0 or pool.n_malicious == 0:
        why = sp.skip_reason or f"{pool.n_benign} benign / {pool.n_malicious} malicious images"
        return PoolJob(tags, None, ratio, rng, skip=why)
    return PoolJob(tags, sp.features[level][pool.rows], ratio, rng)


def detect_each(detect: Detector, jobs: list[bytes], reserves: dict[str, np.ndarray], opts: Any
                ) -> list[DetectorOutput | SkipPool]:
    """The detector on every pool in turn (the run sealed around all of them, once): each pool's
    job stays pickled until its turn, so no frame holds two pools in the clear. A pool the detector
    cannot screen gives its SkipPool."""
    return [_detect_one(detect, job, reserves, opts) for job in jobs]


def _detect_one(detect: Detector, pickled: bytes, reserves: dict[str, np.ndarray], opts: Any):
    job = pickle.loads(pickled)
    try:
        return detect(job.features, reserves[job.tags["level"]], opts, assumed_ratio=job.assumed_ratio,
                      rng=job.rng)
    except SkipPool as err:
        return err


def pool_records(exp, i: int, tags: dict, out: DetectorOutput) -> list[dict]:
    """Score the detector's output on pool `i` against its labels, read only now (the evaluator side)."""
    pool = screening_pools(exp).pools[i]
    tags = {**tags, **out.tags}
    rows = [record(metric, value, **tags) for metric, value in score_pool(pool.labels, out).items()]
    rows += [record("n_benign", pool.n_benign, **tags), record("n_malicious", pool.n_malicious, **tags)]
    return rows + [record(metric, value, **tags) for metric, value in out.extra.items()]


def run_pool_detector(exp, name: str, opts: Any, detect: Detector) -> list[dict]:
    """Run `detect` on every level × pool (N, r′) of ML-MMDR §6.1 and score it (the evaluator side).

    Records per level × pool, tagged ``level``, ``N`` and ``r`` (what the pool holds, `Pool.tags`;
    configurations that give the very same images are one pool) and the detector's own `tags`
    (its decision rule): f1, precision, recall (of that rule), f1_max, auroc, n_benign,
    n_malicious and the detector's `extra` diagnostics; or ``skipped`` = 1.0 when the pool has no
    malicious/benign images or the detector raised SkipPool. The run is sealed once around all the
    pools (`detect_each`); labels are read after the detector returns (`pool_records`)."""
    start = time.perf_counter()
    sp = screening_pools(exp)
    plan = [(level, i) for level in sp.levels for i in range(len(sp.pools))]
    levels, reserves = sp.levels, dict(sp.reserve)
    del sp
    done: dict[int, list[dict]] = {}
    skips: dict[str, list[str]] = {}
    jobs, scored = [], []  # pickled jobs, and (plan position, pool, tags) of each
    for k, (level, i) in enumerate(plan):
        job = pool_job(exp, name, level, i)
        if job.skip is not None:
            done[k] = [_skipped(job.tags, job.skip, skips)]
        else:
            jobs.append(pickle.dumps(job, protocol=pickle.HIGHEST_PROTOCOL))
            scored.append((k, i, job.tags))
        del job
    outputs = sealed_call(exp, name, detect_each, detect, jobs, reserves, opts) if jobs else []
    del jobs
    for (k, i, tags), out in zip(scored, outputs):
        done[k] = [_skipped(tags, str(out), skips)] if isinstance(out, SkipPool) else pool_records(exp, i, tags, out)
    _warn_skipped(name, skips, len(plan))
    ran = sum(not isinstance(out, SkipPool) for out in outputs)
    if ran:  # with none scored the warning above says it all
        log.info("%s: %d of %d pools scored on levels %s in %.2f s", name, ran, len(plan), ",".join(levels),
                 time.perf_counter() - start)
    return [row for k in range(len(plan)) for row in done[k]]


def _probe(act):
    """A pool detector that changes nothing (contexts.KindSpec.probe): scores the first feature."""
    def detect(features, reserve, opts, *, assumed_ratio, rng):
        act("")
        return DetectorOutput(np.asarray(features)[:, 0].astype(np.float64), None)

    return detect


register_kind(Kind.pool_detector, lambda exp, name, opts, fn, meta: run_pool_detector(exp, name, opts, fn), _probe)
