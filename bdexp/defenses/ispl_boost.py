"""Boosting homogeneous sets and self-training (ISPL paper §3.3, Algorithm 2; App. C).

Library code, registers nothing. The clusters come from `ispl_core.ispl_clusters`; the config
keys (with defaults, sources and the authors'-code variants) are documented in `ispl_core`.

`ispl_boost` ties the defense together:
  1. `rounds` independent ISPL partitions of the training set into `num_clusters` clusters;
  2. one weak learner per cluster (a fresh model, `learner_epochs` on its cluster) votes on every
     sample; the vote rule (`vote_rule`) decides which samples are kept (§3.3, App. C);
  3. optional self-training from the kept set (`self_training`, App. C).
"""
from __future__ import annotations

import logging
import math
import time
from typing import Any

import numpy as np

from bdexp.defenses.ispl_core import ISPLOptions, Metered, Trainer, ispl_clusters

log = logging.getLogger(__name__)


def modal_vote(preds: np.ndarray, num_classes: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Per column of the (learners, n) vote matrix: the modal class, ties broken uniformly at
    random (App. C), and how many learners cast it."""
    n = preds.shape[1]
    counts = np.zeros((n, num_classes), dtype=np.int64)
    for row in preds:
        counts[np.arange(n), row] += 1
    # Integer counts plus noise in [0, 0.5): the order between different counts is unchanged and
    # among tied classes the argmax is uniform.
    mode = (counts + 0.5 * rng.random(counts.shape)).argmax(1)
    return mode, counts.max(1)


def lower_half(loss: np.ndarray, y: np.ndarray) -> np.ndarray:
    """True for the ⌊n_c/2⌋ lowest-loss samples of every class c (App. C "the lower half of its
    class by loss")."""
    keep = np.zeros(len(y), dtype=bool)
    for c in np.unique(y):
        rows = np.flatnonzero(y == c)
        keep[rows[np.argsort(loss[rows], kind="stable")[: len(rows) // 2]]] = True
    return keep


def vote_keep(preds: np.ndarray, y: np.ndarray, mean_loss: np.ndarray, rule: str,
              rng: np.random.Generator, num_classes: int | None = None) -> np.ndarray:
    """The keep mask from the weak learners' votes `preds` (learners, n).

    paper: modal vote == label, or in the lower half of its class by `mean_loss` (App. C).
    code:  modal vote == label and cast by at least 2 learners (authors' public code)."""
    k = int(num_classes if num_classes is not None else max(preds.max(initial=0), y.max(initial=0)) + 1)
    mode, count = modal_vote(preds, k, rng)
    if rule == "paper":
        return (mode == y) | lower_half(mean_loss, y)
    if rule == "code":
        return (mode == y) & (count >= 2)
    raise ValueError(f"ispl vote_rule must be 'paper' or 'code', got {rule!r}")


def boost(trainer: Trainer, clusters: list[np.ndarray], y: np.ndarray, cfg: Any,
          rng: np.random.Generator, tag: str = "ispl") -> np.ndarray:
    """Algorithm 2 in App. C's per-sample form: fit a fresh weak learner to each cluster (θ_i ←
    A(S_i)), let each vote on every training sample, keep by `vote_rule`. Returns a bool mask."""
    y = np.asarray(y)
    n, everything = len(y), np.arange(len(y))
    epochs = cfg.learner_epochs
    preds = np.zeros((len(clusters), n), dtype=np.int64)
    loss_sum = np.zeros(n)
    num_classes = int(y.max()) + 1 if n else 0
    for j, cluster in enumerate(clusters):
        model = trainer.fit(cluster, epochs, int(rng.integers(2**31)),
                            describe=f"{tag} weak learner {j + 1}/{len(clusters)}",
                            schedule=cfg.learner_schedule, schedule_epochs=epochs)
        lp = trainer.log_probs(model, everything)
        num_classes = max(num_classes, lp.shape[1])
        preds[j] = lp.argmax(1)
        loss_sum += -lp[everything, y].astype(np.float64)
        del model
    mean_loss = np.nan_to_num(loss_sum / max(len(clusters), 1), nan=np.inf, posinf=np.inf)
    keep = vote_keep(preds, y, mean_loss, cfg.vote_rule, rng, num_classes)
    log.info("%s boosting: %d weak learners, %d of %d samples kept (%s rule)", tag, len(clusters),
             int(keep.sum()), n, cfg.vote_rule)
    return keep


def self_train(trainer: Trainer, keep: np.ndarray, y: np.ndarray, cfg: Any, rng: np.random.Generator,
               tag: str = "ispl") -> np.ndarray:
    """App. C self-training: a fresh model trained for `st_epochs` from the kept set; every
    `st_interval` epochs its smoothed predictions on *all* samples (so excluded samples can be
    recovered) redefine the training set as the samples whose label they agree with. Returns the
    set used for the last segment ("the samples used for training in the last epoch")."""
    y = np.asarray(y)
    n, everything = len(y), np.arange(len(y))
    total, interval = cfg.st_epochs, cfg.st_interval
    m, smooth = cfg.st_momentum, cfg.st_smooth
    if smooth not in ("probs", "agreement"):
        raise ValueError(f"ispl st_smooth must be 'probs' or 'agreement', got {smooth!r}")
    index = np.flatnonzero(keep)
    if total <= 0 or len(index) == 0:
        return np.asarray(keep, dtype=bool).copy()
    segments = math.ceil(total / interval)
    state: np.ndarray | None = None  # P (probs, starts at 0) or A (agreement, starts at 0.5)
    model = None
    for s in range(segments):
        epochs = min(interval, total - s * interval)
        # One training of `total` epochs: the model, its optimizer and lr schedule carry on
        # across segments; only the training subset changes (App. C: "a fresh model for 100 epochs").
        model = trainer.fit(index, epochs, int(rng.integers(2**31)), init_state=model,
                            describe=f"{tag} self-training {s + 1}/{segments}",
                            schedule=cfg.st_schedule, schedule_epochs=total)
        if s == segments - 1:
            break
        lp = trainer.log_probs(model, everything)
        if smooth == "probs":
            probs = np.exp(lp.astype(np.float64))
            state = (1 - m) * probs if state is None else m * state + (1 - m) * probs
            agree = state.argmax(1) == y
        else:
            hit = (lp.argmax(1) == y).astype(np.float64)
            state = (m * 0.5 if state is None else m * state) + (1 - m) * hit
            agree = state > 0.5
        if not agree.any():
            log.warning("%s self-training: the model agrees with no label; keeping the previous set", tag)
            continue
        index = np.flatnonzero(agree)
        log.info("%s self-training %d/%d: %d samples agree with the smoothed predictions", tag, s + 1,
                 segments, len(index))
    out = np.zeros(n, dtype=bool)
    out[index] = True
    return out


def ispl_boost(trainer: Trainer, y: np.ndarray, cfg: Any, rng: np.random.Generator,
               tag: str = "ispl") -> tuple[np.ndarray, dict]:
    """The whole ISPL + boosting (+ self-training) sanitizer on the trainer's training set.

    Returns (keep, info): keep is a bool mask over the rows of `y` (the sanitized set). info is
    JSON-friendly except info["arrays"] = {"clusters": [index arrays, round-major],
    "keep_boost": the mask before self-training}, for analyses (drop it before serializing)."""
    y = np.asarray(y)
    n = len(y)
    meter = Metered(trainer)
    start = time.perf_counter()
    clusters: list[np.ndarray] = []
    sizes: list[list[int]] = []
    rounds = cfg.rounds
    for r in range(rounds):
        part = ispl_clusters(meter, np.arange(n), y, cfg, rng, tag=f"{tag} round {r + 1}/{rounds}")
        clusters += part
        sizes.append([len(c) for c in part])
    t_ispl = time.perf_counter()
    cost_ispl = meter.summary(n)
    keep_boost = boost(meter, clusters, y, cfg, rng, tag=tag)
    t_boost = time.perf_counter()
    keep = keep_boost
    if cfg.self_training:
        keep = self_train(meter, keep_boost, y, cfg, rng, tag=tag)
    end = time.perf_counter()
    info = {
        "cluster_sizes": sizes,
        "n_learners": len(clusters),
        "kept_boost": int(keep_boost.sum()),
        "kept": int(keep.sum()),
        "removed": int(n - keep.sum()),
        "cost": meter.summary(n),
        "cost_ispl": cost_ispl,
        "wall_s": {"ispl": t_ispl - start, "boost": t_boost - t_ispl, "self_train": end - t_boost,
                   "total": end - start},
        "arrays": {"clusters": clusters, "keep_boost": keep_boost},
    }
    log.info("%s: kept %d of %d (boosting kept %d); %.1f data-epochs of training in %.1fs", tag,
             info["kept"], n, info["kept_boost"], info["cost"]["data_epochs"], info["wall_s"]["total"])
    return keep, info
