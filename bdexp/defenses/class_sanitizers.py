"""SS and AC as per-class training-set sanitizers: ISPL's baselines (ISPL §4.2, Table 2, App. C).

Both screen each class of the poisoned training set (by its given label) on the run's model's
features and remove what they flag; the sanitizer protocol then retrains on the rest. Neither
reads the poison flags, the attack or its config: the only ε they know is the defender's `eps`.

Layer (`level`; null = `level_by_model[model]`, the same table for both, ISPL App. C: "we used
the same layers as for Spectral Signatures"). App. C: PreActResNet18 "the input to the first
block of the fourth layer" = layer3's output = `s2` (also for ResNet-18); ResNet32 "the input to
the third block of the third layer", which our models do not expose: the nearest level in that
stage is its output `s3` (the YAMLs say so per model).

- `ss_train` (ISPL App. C): "The authors suggest removing 1.5 times the maximum expected amount of
  poison from each class ... We remove 20% of each class for ε = 5, 10% ... and 30% of each class
  for ε = 20%." From the defender's assumed ε (`eps`) every class loses the fraction
  max(`min_removal_fraction`, `removal_factor`·ε) of its rows with the highest spectral scores
  ((x−μ)·v)² (Tran et al.'s). With 0.2 and 1.5 this gives exactly the listed points (20, 20, 30 %);
  between and beyond them it is the 1.5×-of-the-maximum rule, never below the 20 % used at 5–10 %.
- `ac_train` (ISPL App. C: ART's ActivationDefence "with the default parameters values in ART
  v1.6.2"; §5: "runs k-means clustering (k=2) on the activation patterns, then discards the
  smallest cluster"): 2-means on 10 reduced dims per class, the smaller cluster removed
  (ART's `cluster_analysis="smaller"`), via `bdexp.defenses.ac.detect_ac` with `criterion: size`.
"""
from __future__ import annotations

import numpy as np
import torch

from bdexp.defenses import DEFENSES
from bdexp.defenses.ac import detect_ac
from bdexp.defenses.sanitize import run_sanitizer
from bdexp.defenses.ss import n_removed, spectral_scores
from bdexp.errors import ConfigError
from bdexp.models import LEVELS
from bdexp.results import record


def sanitizer_level(exp, cfg) -> str:
    """The feature level: `level`, or the run's model's entry in `level_by_model` when it is null."""
    name = cfg.get("name")
    level = cfg.get("level")
    if level is None:
        model = str(exp.cfg.model.name)
        table = cfg.get("level_by_model") or {}
        if model not in table:
            raise ConfigError(
                f"defense.{name}.level=null takes the layer from defense.{name}.level_by_model, which has no "
                f"entry for model={model!r}; set defense.{name}.level to one of {list(LEVELS)} or add the model"
            )
        level = table[model]
    if level not in LEVELS:
        raise ConfigError(f"defense.{name}.level={level!r} is not a feature level; choose one of {list(LEVELS)}")
    return str(level)


def ss_removal_fraction(cfg) -> float:
    """max(min_removal_fraction, removal_factor·eps): the share of every class SS removes (module
    docstring), from the defender's assumed ε alone."""
    name = cfg.get("name")
    eps = cfg.get("eps")
    if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not 0 < eps < 1:
        raise ConfigError(
            f"defense.{name}.eps={eps!r} must be the defender's assumed poison fraction in (0, 1) (ISPL's ε, "
            "e.g. 0.05, 0.1, 0.2); it is never read off the poisoned data"
        )
    fraction = max(float(cfg.min_removal_fraction), float(cfg.removal_factor) * float(eps))
    if not 0 < fraction < 1:
        raise ConfigError(
            f"defense.{name}: removal fraction max(min_removal_fraction, removal_factor * eps) = {fraction:.3f} "
            f"must be in (0, 1); lower defense.{name}.eps or removal_factor"
        )
    return fraction


def _class_features(exp, level: str):
    """(row indices, features at `level`) of each class of the training set by its given label;
    one class at a time, so wide levels (s2 of a PreActResNet-18: 16 384 dims) stay small."""
    y = exp.train_set.y
    for c in torch.unique(y).tolist():
        rows = (y == c).nonzero().flatten()
        _, feats = exp.features(exp.train_set.x[rows], levels=(level,))
        yield rows.numpy(), feats[level].numpy()


def ss_keep(exp, cfg) -> tuple[torch.Tensor, dict]:
    fraction = ss_removal_fraction(cfg)
    keep = np.ones(len(exp.train_set.y), dtype=bool)
    for rows, feats in _class_features(exp, sanitizer_level(exp, cfg)):
        k = n_removed(len(rows), fraction, 1.0)
        if k > 0 and len(rows) > 2:
            scores = spectral_scores(feats)
            keep[rows[np.argsort(-scores, kind="stable")[:k]]] = False
    return torch.from_numpy(keep), {}


def ac_keep(exp, cfg) -> tuple[torch.Tensor, dict]:
    keep = np.ones(len(exp.train_set.y), dtype=bool)
    for rows, feats in _class_features(exp, sanitizer_level(exp, cfg)):
        if len(rows) < 4:
            continue
        c = int(exp.train_set.y[rows[0]])
        out = detect_ac(feats, None, cfg, assumed_ratio=0.0, rng=exp.rng(f"ac_train/{c}"))
        keep[rows[out.flagged]] = False
    return torch.from_numpy(keep), {}


@DEFENSES.register("ss_train")
def ss_train(exp, cfg) -> list[dict]:
    level, fraction = sanitizer_level(exp, cfg), ss_removal_fraction(cfg)  # config errors before any work
    return run_sanitizer(exp, cfg, ss_keep) + [
        record("assumed_eps", float(cfg.eps), level=level),
        record("removal_fraction", fraction, level=level),
    ]


@DEFENSES.register("ac_train")
def ac_train(exp, cfg) -> list[dict]:
    level, criterion = sanitizer_level(exp, cfg), str(cfg.get("criterion"))
    if criterion not in ("size", "silhouette"):  # `reserve` needs clean images the baseline does not hold
        raise ConfigError(
            f"defense.ac_train.criterion={criterion!r} is not allowed for the training-set baseline (it has no "
            "clean reserve); use size (ART's cluster_analysis='smaller', ISPL App. C) or silhouette"
        )
    return run_sanitizer(exp, cfg, ac_keep) + [
        record("n_components", float(cfg.n_components), level=level, rule=criterion),
    ]
