"""Inverse Self-Paced Learning (ISPL paper §2.4, Algorithm 1; App. C) as library code.

Nothing here is registered: `defense=ispl` is wired elsewhere. The boosting and self-training
steps that consume the clusters live in `ispl_boost.py`. Every function takes the algorithm's
settings from one `ISPLOptions` (below); `ISPLOptions.parse(mapping)` fills in the defaults.

Config keys (default; source; the authors' public code where it differs):
  alpha          0.25   ISPL expansion α: each iteration trains on a random α-fraction of the
                        current set, drawn per class (App. C "α is set to 1/4"; §2.4 SAMPLE).
                        [code: 1st iteration trains on the whole remaining pool, or a random
                        half of it for the very first cluster; α only from the 2nd iteration]
  momentum       0.9    η, loss smoothing L ← ηL + (1−η)·loss, L starts at 0 (Alg. 1, l. 2/6).
  rounds         3      independent ISPL partitions; rounds × num_clusters weak learners
                        (App. C: "run ISPL 3 times to generate 24 weak learners" on CIFAR-10).
  num_clusters   8      clusters per round, each targeting 1/num_clusters of the full set
                        (App. C: 8 on CIFAR-10 (~12 % each), 4 on GTSRB (~24 %)). Cluster i
                        uses p = (n/num_clusters)/|remaining pool|, capped at 1 (App. C:
                        "p ≈ 1/(8−i+1)"), so the last cluster is whatever is left.
                        [code: stops once ≤ 2000 samples remain; those form no cluster]
  iter_epochs    4      SGD epochs per ISPL iteration (App. C; also the code).
  warmup_epochs  8      epochs of the first ISPL iteration (App. C "warm-up ... of 8 epochs").
                        One model is trained on across a cluster's iterations (θ_t ← A(S′,
                        θ_{t−1}), Alg. 1 l. 5, as in the code), and with it one optimizer: the
                        SGD momentum buffers and the lr schedule carry on from one iteration
                        to the next (as in the code); only the training subset changes.
  iter_schedule  constant  lr schedule of a cluster's iterations: constant (the defender
                        regime's lr throughout; our reading of App. C's "standard SGD, trained
                        for 4 epochs per iteration", which names no decay) | step (the regime's
                        milestones as fractions of the cluster's whole warmup + (N−1)·iter
                        epochs, one schedule across the iterations).
  beta_start     3.0    β_1 = beta_start·p, then linearly down to p over `anneal_iters`
  anneal_iters   2      iterations: 3p → 2p → p → p … (App. C); β is capped at 1.
                        [code: β_t = min(3, max(1, N−2−t))·p, i.e. it starts at (N−2)p]
  class_floor    0.125  also keep the ⌈class_floor·p·n_c⌉ lowest-loss samples of every class
                        c of the pool ("the top p/8 samples per class", App. C).
                        [code: β_t/8 per class, annealed with β]
  learner_epochs 40     epochs of each weak learner, a fresh model on its cluster (App. C).
  learner_schedule constant  lr schedule of a weak learner: constant (the authors' code trains
                        weak learners at a constant rate; App. C: "trained for 40 epochs on its
                        respective subset") | step (milestones as fractions of learner_epochs).
  vote_rule      paper  paper: keep a sample if the modal vote of the weak learners equals its
                        label (ties at random) or it is in the lower half of its class by loss
                        (App. C); the loss is the weak learners' mean cross-entropy (our reading:
                        the paper does not say whose loss). code: keep if the modal vote (ties at
                        random) equals the label and at least 2 learners cast it; no loss rule.
  self_training  true   the final self-training step (App. C: CIFAR-10 yes, GTSRB no).
  st_interval    5      epochs between training-set updates (App. C; code: 20 × 5 epochs).
  st_momentum    0.8    smoothing of the predictions P ← mP + (1−m)·softmax, P starts at 0;
                        the training set becomes {i : argmax P_i = y_i} (App. C).
  st_smooth      probs  probs (paper, as above) | agreement: the code's smoothing of the 0/1
                        agreement A ← mA + (1−m)·[pred = y] from A = 0.5, keeping A > 0.5.
  st_epochs      100    total self-training epochs (App. C: "a fresh model for 100 epochs"). The
                        set used for the last `st_interval` epochs is the result (App. C "the
                        samples used for training in the last epoch") [code: one more update
                        after the last epoch]. Each segment of st_interval epochs is one
                        `train_model` call that continues the model (as in the code), its
                        optimizer and its lr schedule: one training of st_epochs epochs whose
                        training subset changes every st_interval epochs.
  st_schedule    step   lr schedule of self-training: step (the defender regime's milestones as
                        fractions of the whole st_epochs, at absolute epochs: App. C trains "a
                        fresh model for 100 epochs", i.e. one ordinary training run) | constant.
"""
from __future__ import annotations

import logging
import math
import time
import weakref
from dataclasses import dataclass
from typing import Any, Literal, Protocol, Sequence

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf

from bdexp.data.loader import iterate_eval, to_uint8
from bdexp.models import build_for, image_stats
from bdexp.options import Options, option
from bdexp.training.base import Regime
from bdexp.training.defender import DefenderLoader
from bdexp.training.loop import Optimization, ScheduleName, train_model

log = logging.getLogger(__name__)

@dataclass(frozen=True)
class ISPLOptions(Options):
    """The algorithm's settings; the module docstring gives each one's source."""

    alpha: float = option(0.25, lo=0, hi=1, lo_open=True)
    momentum: float = option(0.9, lo=0, hi=1)
    rounds: int = option(3, lo=1)
    num_clusters: int = option(8, lo=1)
    iter_epochs: int = option(4, lo=0)
    warmup_epochs: int = option(8, lo=0)
    beta_start: float = option(3.0, lo=0)
    anneal_iters: int = option(2, lo=0)
    class_floor: float = option(0.125, lo=0)
    learner_epochs: int = option(40, lo=0)
    vote_rule: Literal["paper", "code"] = "paper"
    self_training: bool = True
    st_interval: int = option(5, lo=1)
    st_momentum: float = option(0.8, lo=0, hi=1)
    st_smooth: Literal["probs", "agreement"] = "probs"
    st_epochs: int = option(100, lo=0)
    iter_schedule: ScheduleName = "constant"
    learner_schedule: ScheduleName = "constant"
    st_schedule: ScheduleName = "step"


class Trainer(Protocol):
    """What the algorithms need from a learner A (Alg. 1 l. 5); rows are indices into one fixed
    training set whose given labels the trainer holds."""

    def fit(self, index: np.ndarray, epochs: int, seed: int, init_state: Any = None,
            describe: str = "", schedule: str = "step", schedule_epochs: int | None = None) -> Any:
        """Train a fresh model (or continue `init_state`, a model returned earlier, with its
        optimizer) on `index` for `epochs` epochs. A fresh model gets a new optimizer whose lr
        `schedule` ("step" | "constant") spans `schedule_epochs` epochs (None: this call's
        epochs); later calls that continue it run the next epochs of that schedule."""

    def log_probs(self, model: Any, index: np.ndarray) -> np.ndarray:
        """(len(index), K) log-softmax outputs, without augmentation."""


def sample_losses(trainer: Trainer, model: Any, index: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Per-sample cross-entropy of `model` on rows `index` under their given labels."""
    lp = trainer.log_probs(model, index)
    loss = -lp[np.arange(len(index)), y[index]].astype(np.float64)
    bad = ~np.isfinite(loss)
    if bad.any():  # a diverged logit: rank it as the mean (the code does the same)
        loss[bad] = loss[~bad].mean() if (~bad).any() else 0.0
    return loss


class TensorTrainer:
    """`Trainer` on device-resident uint8 images: build_model + DefenderLoader + train_model.

    `train_cfg` holds lr, momentum, weight_decay, milestones (fractions of a schedule's
    `schedule_epochs`), gamma, batch_size (and optionally nesterov, amp, log_every); epochs come
    per call. `regime`: the loss (a Regime class; plain cross-entropy by default), built without
    the attack; batches carry no poison flags (training/defender.py). Each model's
    `Optimization` is kept with it, so a call that continues a model continues its optimizer."""

    def __init__(self, x_uint8: torch.Tensor, y: torch.Tensor | np.ndarray, model_cfg: Any,
                 train_cfg: Any, device: torch.device, crop_padding: int = 0, flip: bool = False,
                 mean: Sequence[float] | None = None, std: Sequence[float] | None = None,
                 eval_batch_size: int = 512, num_classes: int | None = None, regime: type = Regime):
        self.device = torch.device(device)
        x_uint8 = x_uint8 if x_uint8.dtype == torch.uint8 else to_uint8(x_uint8)
        self.x = x_uint8.to(self.device)
        y_t = y if isinstance(y, torch.Tensor) else torch.as_tensor(np.asarray(y))
        self.y = y_t.long().to(self.device)
        self.num_classes = int(num_classes) if num_classes else int(self.y.max().item()) + 1
        self.model_cfg = model_cfg
        # A plain (non-struct) copy: per-call `epochs` is merged in even where the run's node is struct.
        if isinstance(train_cfg, DictConfig):
            plain = OmegaConf.to_container(train_cfg, resolve=True)
        else:
            plain = dict(train_cfg)
        self.train_cfg = OmegaConf.create(plain)
        self.crop_padding, self.flip = int(crop_padding), bool(flip)
        if mean is None or std is None:
            m, sd = image_stats(x_uint8)
            mean, std = (m if mean is None else mean), (sd if std is None else std)
        self.mean, self.std = list(mean), list(std)
        self.eval_batch_size = int(eval_batch_size)
        self.regime = regime
        self._optim: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # model -> Optimization

    def new_model(self, seed: int) -> torch.nn.Module:
        torch.manual_seed(int(seed))  # the init is a function of the seed alone
        return build_for(self.model_cfg, self.x, self.num_classes, stats=(self.mean, self.std)).to(self.device)

    def fit(self, index: np.ndarray, epochs: int, seed: int, init_state: Any = None,
            describe: str = "ispl", schedule: str = "step", schedule_epochs: int | None = None) -> torch.nn.Module:
        model = self.new_model(seed) if init_state is None else init_state
        if epochs <= 0 or len(index) == 0:
            return model.eval()
        cfg = OmegaConf.merge(self.train_cfg, {"epochs": int(epochs)})
        optim = self._optim.get(model) if init_state is not None else None
        if optim is None:
            optim = Optimization(model, cfg, total_epochs=int(schedule_epochs or epochs), schedule=schedule)
            self._optim[model] = optim
        if optim.schedule == "step" and optim.epochs_done + int(epochs) > optim.total_epochs:
            raise ValueError(f"{describe}: epochs {optim.epochs_done}..{optim.epochs_done + int(epochs)} run past "
                             f"the {optim.total_epochs}-epoch schedule the model was started with")
        rows = torch.as_tensor(np.asarray(index), dtype=torch.long, device=self.device)
        loader = DefenderLoader(self.x[rows], self.y[rows], batch_size=int(cfg.batch_size), device=self.device,
                                seed=int(seed), crop_padding=self.crop_padding, flip=self.flip, drop_last=True)
        train_model(model, loader, self.regime(cfg, attack=None), cfg, self.device, describe=describe,
                    optimization=optim)
        return model

    @torch.no_grad()
    def log_probs(self, model: torch.nn.Module, index: np.ndarray) -> np.ndarray:
        model.eval()
        rows = torch.as_tensor(np.asarray(index), dtype=torch.long, device=self.device)
        out = [torch.log_softmax(model(xb).float(), 1).cpu()
               for xb in iterate_eval(self.x[rows], self.eval_batch_size, self.device)]
        return torch.cat(out).numpy() if out else np.zeros((0, self.num_classes), np.float32)


class Metered:
    """A `Trainer` proxy that counts the cost: fits, model-epochs, sample-epochs, evaluated rows."""

    def __init__(self, trainer: Trainer):
        self.trainer = trainer
        self.fits = self.model_epochs = self.sample_epochs = self.eval_samples = 0

    def fit(self, index: np.ndarray, epochs: int, seed: int, init_state: Any = None,
            describe: str = "", schedule: str = "step", schedule_epochs: int | None = None) -> Any:
        self.fits += 1
        self.model_epochs += int(epochs)
        self.sample_epochs += int(epochs) * len(index)
        return self.trainer.fit(index, epochs, seed, init_state=init_state, describe=describe,
                                schedule=schedule, schedule_epochs=schedule_epochs)

    def log_probs(self, model: Any, index: np.ndarray) -> np.ndarray:
        self.eval_samples += len(index)
        return self.trainer.log_probs(model, index)

    def summary(self, n: int) -> dict[str, float]:
        return {"fits": self.fits, "model_epochs": self.model_epochs, "sample_epochs": self.sample_epochs,
                "data_epochs": self.sample_epochs / max(n, 1), "eval_samples": self.eval_samples}


# ---- Algorithm 1 pieces ----------------------------------------------------------------------

def n_iterations(p: float) -> int:
    """N = 2 + min(3, ⌊1/p⌋) (App. C); p is the cluster's target share of the remaining pool."""
    return 2 + min(3, math.floor(1.0 / p + 1e-9))


def beta_schedule(p: float, n_iter: int, start: float, anneal: int) -> list[float]:
    """β_t for t = 1..N: start·p, then linearly down to p over `anneal` iterations, capped at 1
    (App. C: "β starts at 3∗p ... then drops linearly to its final value of p over the next 2")."""
    out = []
    for t in range(n_iter):
        mult = max(1.0, start - t * (start - 1.0) / anneal) if anneal > 0 else 1.0
        out.append(min(1.0, mult * p))
    return out


def stratified_sample(index: np.ndarray, y: np.ndarray, frac: float, rng: np.random.Generator) -> np.ndarray:
    """SAMPLE(S, α) (§2.4): a uniform α fraction of each class of `index` (≥ 1 per class)."""
    parts = []
    for c in np.unique(y[index]):
        rows = index[y[index] == c]
        k = min(len(rows), max(1, int(round(frac * len(rows)))))
        parts.append(rng.choice(rows, size=k, replace=False))
    return np.sort(np.concatenate(parts)) if parts else index[:0]


def trim(pool: np.ndarray, y: np.ndarray, loss: np.ndarray, beta: float, floor: float) -> np.ndarray:
    """TRIM(L, β) (§2.4): the ⌈β|S|⌉-ish lowest-loss rows of `pool` (round(β|S|), at least 1),
    plus the ⌈floor·n_c⌉ lowest of every class c ("prevents collapse", App. C). `loss` is
    aligned with `pool`; returns sorted indices into the training set."""
    keep = np.zeros(len(pool), dtype=bool)
    k = min(len(pool), max(1, int(round(beta * len(pool)))))
    keep[np.argsort(loss, kind="stable")[:k]] = True
    labels = y[pool]
    for c in np.unique(labels):
        rows = np.flatnonzero(labels == c)
        kc = min(len(rows), math.ceil(floor * len(rows) - 1e-9))
        keep[rows[np.argsort(loss[rows], kind="stable")[:kc]]] = True
    return pool[keep]


def ispl_cluster(trainer: Trainer, pool: np.ndarray, y: np.ndarray, p: float, cfg: Any,
                 rng: np.random.Generator, tag: str = "ispl") -> np.ndarray:
    """One ISPL cluster (Alg. 1 with App. C's settings) from `pool`: ≈ p·|pool| rows plus the
    class floors. p ≥ 1 returns the whole pool (β would be 1 throughout: nothing to train)."""
    pool = np.asarray(pool)
    if p >= 1.0 or len(pool) == 0:
        return np.sort(pool)
    n_iter = n_iterations(p)
    betas = beta_schedule(p, n_iter, cfg.beta_start, cfg.anneal_iters)
    alpha, eta = cfg.alpha, cfg.momentum
    floor = cfg.class_floor * p
    smoothed = np.zeros(len(pool))  # L ← 0 (Alg. 1 l. 2)
    current, model = pool, None
    warmup, per_iter = cfg.warmup_epochs, cfg.iter_epochs
    for t in range(n_iter):
        sub = stratified_sample(current, y, alpha, rng)  # S′ ← SAMPLE(S_{t−1}, α)   (l. 4)
        model = trainer.fit(sub, warmup if t == 0 else per_iter, int(rng.integers(2**31)),  # θ_t (l. 5)
                            init_state=model, describe=f"{tag} it {t + 1}/{n_iter}",
                            schedule=cfg.iter_schedule,
                            schedule_epochs=warmup + (n_iter - 1) * per_iter)
        smoothed = eta * smoothed + (1 - eta) * sample_losses(trainer, model, pool, y)  # (l. 6)
        current = trim(pool, y, smoothed, betas[t], floor)  # S_t ← TRIM(L, β_t)   (l. 7)
    return current


def ispl_clusters(trainer: Trainer, pool: np.ndarray, y: np.ndarray, cfg: Any, rng: np.random.Generator,
                  tag: str = "ispl") -> list[np.ndarray]:
    """Partition `pool` by repeated ISPL (Thm 2.3's peeling, §2.4): extract a cluster, remove
    it, repeat `num_clusters` times with p = (|pool|/num_clusters)/|remaining| (App. C)."""
    pool = np.asarray(pool)
    k = cfg.num_clusters
    target = len(pool) / k
    remaining, clusters = np.sort(pool), []
    for i in range(k):
        if len(remaining) == 0:
            break
        p = min(1.0, target / len(remaining))
        start = time.perf_counter()
        cluster = ispl_cluster(trainer, remaining, y, p, cfg, rng, tag=f"{tag} c{i + 1}/{k}")
        clusters.append(cluster)
        remaining = np.setdiff1d(remaining, cluster, assume_unique=True)
        log.info("%s cluster %d/%d: p=%.3f, %d iterations, %d samples (%d remain), %.1fs", tag, i + 1, k, p,
                 0 if p >= 1 else n_iterations(p), len(cluster), len(remaining), time.perf_counter() - start)
    return clusters
