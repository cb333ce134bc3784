"""SS and AC as per-class training-set sanitizers: ISPL's baselines (ISPL §4, Table 2; SPEC §5.4).

Both screen each class of the poisoned training set (by its given label) on the run's model's
features at `level` (penultimate by default, as Tran et al. and Chen et al. do) and remove what
they flag; the sanitizer protocol then retrains on the rest.
- `ss_train`: remove the ⌈`removal_factor` · n_expected⌉ highest spectral scores of every class,
  where n_expected is the poison count the defender is told (`eps`·N when `eps` is set, else the
  true count — the usual assumption of SS evaluations that ε is known), capped at half the class.
- `ac_train`: 2-means in ICA space per class; remove the smaller cluster when it holds at most
  `max_size_fraction` of the class (original AC's relative-size rule).
"""
from __future__ import annotations

import math

import numpy as np
import torch

from bdexp.defenses import DEFENSES
from bdexp.defenses.ac import detect_ac
from bdexp.defenses.sanitize import run_sanitizer
from bdexp.defenses.ss import spectral_scores


def _class_features(exp, level: str) -> tuple[np.ndarray, np.ndarray]:
    _, feats = exp.features(exp.train_set.x, levels=(level,))
    return feats[level].numpy(), exp.train_set.y.numpy()


def ss_keep(exp, cfg) -> tuple[torch.Tensor, dict]:
    feats, y = _class_features(exp, str(cfg.level))
    n_total = len(y)
    eps = cfg.get("eps", None)
    expected = float(eps) * n_total if eps is not None else float(exp.train_set.poison.sum())
    keep = np.ones(n_total, dtype=bool)
    for c in np.unique(y):
        rows = np.flatnonzero(y == c)
        k = min(math.ceil(float(cfg.removal_factor) * expected), len(rows) // 2)
        if k > 0 and len(rows) > 2:
            scores = spectral_scores(feats[rows])
            keep[rows[np.argsort(-scores, kind="stable")[:k]]] = False
    return torch.from_numpy(keep), {}


def ac_keep(exp, cfg) -> tuple[torch.Tensor, dict]:
    feats, y = _class_features(exp, str(cfg.level))
    keep = np.ones(len(y), dtype=bool)
    for c in np.unique(y):
        rows = np.flatnonzero(y == c)
        if len(rows) < 4:
            continue
        out = detect_ac(feats[rows], None, cfg, assumed_ratio=0.0, rng=exp.rng(f"ac_train/{c}"))
        keep[rows[out.flagged]] = False
    return torch.from_numpy(keep), {}


@DEFENSES.register("ss_train")
def ss_train(exp, cfg) -> list[dict]:
    return run_sanitizer(exp, cfg, ss_keep)


@DEFENSES.register("ac_train")
def ac_train(exp, cfg) -> list[dict]:
    return run_sanitizer(exp, cfg, ac_keep)
