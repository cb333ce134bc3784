"""The input-level detection protocol shared by CD, the one-class overlap detector, STRIP,
Mahalanobis, MSP and energy (CD; OVL Table II) — the evaluator side.

The defender holds the frozen model and a small clean reserve: `reserve_per_class` clean test
images per class (OVL §III-D3: "10 samples from each class"), a seeded subset of
`exp.reserve_index`. It scores single inputs from two pools (higher = more suspicious):

  train — the poisoned training set as the learner saw it; positive = poison flag
          (CD reports detection on the poisoned training set); WaNet noise-mode
          "cross" samples carry no poison flag and count as clean;
  test  — the backdoor test set: every clean test image outside the reserve (`exp.screen_index`)
          plus every triggered non-target image (`exp.backdoor_test`) whose clean original is
          outside the reserve; positive = triggered (OVL Table II).

`max_pool` caps a pool by a stratified seeded subsample (the poison share is kept); the draw
depends only on the run seed, the pool and the cap, so every detector with the same cap sees
the very same images. A detector is a `build(ctx: DetectorContext, opts) -> score(x_uint8, tag)`:
`build` fits whatever it needs on the reserve once, `score` returns a `DetectorOutput` for a
pool (`tag` names the pool, for seeded per-pool randomness). Detectors never see the labels: both
run while the run is sealed (bdexp/defenses/contexts.py).

Records per pool (tag ``pool``): auroc, aupr, tpr95 (metrics.tpr_at_tpr95_clean: TPR when 95 %
of the clean inputs pass), and for detectors with their own threshold rule tpr, fpr, precision,
f1 of the flags; n, n_poison, wall_s (scoring time) and s_per_1k (seconds per 1000 inputs).
Per run: n_reserve and fit_s (the time `build` took).
"""
from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal, get_args

import numpy as np
import torch

from bdexp import metrics
from bdexp.defenses.contexts import DetectorContext, Kind, ModelView, Reserve, check_context, register_kind, sealed_call
from bdexp.defenses.screening import DetectorOutput, checked_output
from bdexp.errors import ConfigError
from bdexp.options import Options, option
from bdexp.results import record

log = logging.getLogger(__name__)

PoolName = Literal["train", "test"]
POOLS = get_args(PoolName)
INFO_KEY = "input_pools"

Scorer = Callable[[torch.Tensor, str], DetectorOutput]


@dataclass(frozen=True)
class InputDetectorOptions(Options):
    """Keys every input detector has (conf/defense/msp.yaml explains them)."""

    pools: tuple[PoolName, ...] = option(["train", "test"], nonempty=True)
    max_pool: int | None = option(2000, lo=2)  # stratified seeded cap per pool; null = all
    reserve_per_class: int = option(10, lo=1)  # clean reserve images per class (OVL §III-D3: 10)


@dataclass(frozen=True)
class InputPool:
    name: str
    x: torch.Tensor  # uint8 NCHW, in a seeded shuffled order
    labels: np.ndarray  # 1 = poisoned / triggered (evaluator only), aligned with x
    index: np.ndarray  # position of each row in its source set: the training set (train pool);
    #                    x_test for label 0, exp.backdoor_test for label 1 (test pool)
    n_available: int  # pool size before the max_pool cap
    n_poison_available: int


def clean_reserve(exp, per_class: int) -> Reserve:
    """`per_class` images of each class from `exp.reserve_index`, the first of a seeded order (so a
    smaller reserve is a prefix of a larger one); fewer, with a warning, where fewer exist."""
    idx = exp.reserve_index.numpy()
    y = exp.data.y_test.numpy()[idx]
    rng = exp.rng("input_pools/reserve")
    keep, short = [], []
    for c in range(exp.data.num_classes):
        mine = rng.permutation(idx[y == c])
        if len(mine) < per_class:
            short.append(f"{c}: {len(mine)}")
        keep.append(mine[:per_class])
    if short:  # one line for all short classes
        log.warning("reserve: %d class(es) have fewer than reserve_per_class=%d clean reserve images (%s; "
                    "screening.reserve_per_class or the test set limits it)", len(short), per_class, ", ".join(short))
    pos = np.sort(np.concatenate(keep)).astype(np.int64)
    t = torch.as_tensor(pos, dtype=torch.long)
    return Reserve(exp.data.x_test[t], exp.data.y_test[t].clone(), pos)


def stratified_cap(labels: np.ndarray, cap: int | None, rng: np.random.Generator) -> np.ndarray:
    """Rows of a seeded subsample of at most `cap` rows keeping the positive share (rounded, at
    least one of each class that exists), in a shuffled order; all rows shuffled when cap is None."""
    n = len(labels)
    pos, neg = np.flatnonzero(labels == 1), np.flatnonzero(labels == 0)
    if cap is not None and n > cap:
        n_pos = int(round(cap * len(pos) / n))
        n_pos = min(max(n_pos, 1 if len(pos) else 0), len(pos), cap - (1 if len(neg) else 0))
        pos = rng.choice(pos, n_pos, replace=False)
        neg = rng.choice(neg, cap - n_pos, replace=False)
    return rng.permutation(np.concatenate([pos, neg])).astype(np.int64)


def input_pool(exp, name: str, max_pool: int | None) -> InputPool:
    """Pool `name` capped at `max_pool`, memoized per run so detectors share the very same tensors."""
    memo = exp.info.setdefault(INFO_KEY, {})
    if (name, max_pool) in memo:
        return memo[(name, max_pool)]
    if name == "train":
        ts = exp.train_set
        labels = ts.poison.numpy().astype(np.int64)
        index = np.arange(len(labels), dtype=np.int64)
        sources = [ts.x]
    elif name == "test":
        bd = exp.backdoor_test
        clean = exp.screen_index.numpy()
        triggered = np.flatnonzero(~np.isin(bd.index.numpy(), exp.reserve_index.numpy()))
        labels = np.r_[np.zeros(len(clean), np.int64), np.ones(len(triggered), np.int64)]
        index = np.r_[clean, triggered].astype(np.int64)
        sources = [exp.data.x_test, bd.x]
    else:
        raise ConfigError(f"unknown input pool {name!r}; choose from {list(POOLS)}")
    n_available, n_poison_available = len(labels), int(labels.sum())
    # an order a defender who knows the seed cannot recompute (Experiment.truth_rng)
    rows = stratified_cap(labels, max_pool, exp.truth_rng(f"input_pools/{name}/{max_pool}", labels, index))
    labels, index = labels[rows], index[rows]
    if len(sources) == 1:
        x = sources[0][torch.as_tensor(index, dtype=torch.long)]
    else:  # test pool: clean rows from x_test, triggered rows from the backdoor test set
        x = torch.empty((len(rows), *sources[0].shape[1:]), dtype=torch.uint8)
        for label, src in enumerate(sources):
            sel = np.flatnonzero(labels == label)
            x[torch.as_tensor(sel, dtype=torch.long)] = src[torch.as_tensor(index[sel], dtype=torch.long)]
    pool = InputPool(name, x, labels, index, n_available, n_poison_available)
    memo[(name, max_pool)] = pool
    return pool


def evaluate(labels: np.ndarray, out: DetectorOutput) -> dict[str, float]:
    """AUROC, AUPR, TPR95 of the scores (OVL §III-D2 metrics) and, with a threshold rule, the
    flags' TPR / FPR (CD's detection rule) with precision and F1."""
    scores, flagged = checked_output(labels, out)
    res = {"auroc": metrics.auroc(labels, scores), "aupr": metrics.aupr(labels, scores),
           "tpr95": metrics.tpr_at_tpr95_clean(labels, scores)}
    if flagged is not None:
        prf = metrics.detection_scores(labels, flagged)
        res.update(tpr=float(flagged[labels == 1].mean()), fpr=float(flagged[labels == 0].mean()),
                   precision=prf["precision"], f1=prf["f1"])
    return res


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def pool_summary(exp, name: str, max_pool: int | None) -> tuple[int, int]:
    """(inputs, poisoned inputs) of input pool `name`: whether it can be scored at all."""
    pool = input_pool(exp, name, max_pool)
    return len(pool.labels), int(pool.labels.sum())


def run_input_detector(exp, name: str, opts: InputDetectorOptions, build: Callable[[DetectorContext, Any], Scorer],
                       meta: dict) -> list[dict]:
    """Build the detector on the reserve once and score each configured pool (the evaluator side).
    A pool without both clean and poisoned inputs (attack `none`) gets one `skipped` record.
    `meta["tags"]` (optional): opts -> tags on every record (e.g. CD's variant). While the detector
    runs this frame holds the images it scores and no label (they are read after it returns)."""
    tags = dict(meta["tags"](opts)) if meta.get("tags") else {}
    rows: list[dict] = []
    runnable: list[str] = []
    skipped = []
    for pool_name in opts.pools:
        n, n_pos = pool_summary(exp, pool_name, opts.max_pool)
        if n_pos == 0 or n_pos == n:
            skipped.append(f"{pool_name} ({n_pos} poisoned of {n} inputs)")
            rows.append(record("skipped", 1.0, pool=pool_name, **tags))
        else:
            runnable.append(pool_name)
    if skipped:  # one line for all of this detector's skipped pools
        log.warning("%s: skipped %d pool(s): %s", name, len(skipped), ", ".join(skipped))
    if not runnable:
        return rows
    reserve = clean_reserve(exp, opts.reserve_per_class)
    ctx = DetectorContext(seed=exp.seed, view=ModelView(exp.model, exp.device, int(exp.cfg.eval_batch_size)),
                          reserve=reserve, num_classes=exp.data.num_classes)
    check_context(ctx)
    start = time.perf_counter()
    score = sealed_call(exp, name, build, ctx, opts)
    _sync(exp.device)
    fit_s = time.perf_counter() - start
    rows += [record("n_reserve", len(reserve.index), **tags), record("fit_s", fit_s, **tags)]
    for pool_name in runnable:
        x = input_pool(exp, pool_name, opts.max_pool).x
        start = time.perf_counter()
        out = sealed_call(exp, name, score, x, pool_name)
        _sync(exp.device)
        wall = time.perf_counter() - start
        del x
        labels = input_pool(exp, pool_name, opts.max_pool).labels
        ptags = dict(pool=pool_name, **tags)
        rows += [record(m, v, **ptags) for m, v in evaluate(labels, out).items()]
        rows += [record("n", len(labels), **ptags), record("n_poison", int(labels.sum()), **ptags),
                 record("wall_s", wall, **ptags), record("s_per_1k", 1000.0 * wall / len(labels), **ptags)]
        rows += [record(m, v, **ptags) for m, v in out.extra.items()]
        log.info("%s on the %s pool (%d inputs, %d poisoned): AUROC %.3f in %.2f s (fit %.2f s)", name, pool_name,
                 len(labels), int(labels.sum()), metrics.auroc(labels, out.scores), wall, fit_s)
        del labels
    return rows


def _probe(act):
    """An input detector that changes nothing (contexts.KindSpec.probe): scores each image's mean."""
    def build(ctx, opts):
        act("")

        def score(x, tag):
            act("score")
            return DetectorOutput(x.float().flatten(1).mean(1).double().numpy(), None)

        return score

    return build


register_kind(Kind.input_detector, run_input_detector, _probe, InputDetectorOptions, {"max_pool": 40})
