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

from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch

from bdexp.defenses import DEFENSES
from bdexp.defenses.ac import ACOptions, detect_ac
from bdexp.defenses.contexts import Kind, SanitizerContext
from bdexp.defenses.sanitize import SanitizerOptions
from bdexp.defenses.ss import n_removed, spectral_scores
from bdexp.errors import ConfigError
from bdexp.models import LEVELS
from bdexp.models.base import Level
from bdexp.options import option
from bdexp.results import record

# ISPL App. C's layer per model (module docstring); the same table for SS and AC
LEVEL_BY_MODEL = {"preact18": "s2", "resnet18": "s2", "resnet32": "s3", "resnet56": "s3", "convnet": "penult",
                  "vgg11": "penult", "vgg16": "penult"}


@dataclass(frozen=True)
class ClassSanitizerOptions(SanitizerOptions):
    level: Level | None = None  # null: level_by_model[model]
    level_by_model: dict[str, Level] = option(LEVEL_BY_MODEL)


@dataclass(frozen=True)
class SSTrainOptions(ClassSanitizerOptions):
    """conf/defense/ss_train.yaml explains each value."""

    eps: float = option(0.1, lo=0, hi=1, lo_open=True, hi_open=True)  # the defender's assumed ε
    removal_factor: float = option(1.5, lo=0)
    min_removal_fraction: float = option(0.2, lo=0, hi=1)


@dataclass(frozen=True)
class ACTrainOptions(ClassSanitizerOptions, ACOptions):
    """conf/defense/ac_train.yaml explains each value (IBM ART's ActivationDefence defaults, ISPL App. C)."""

    # `reserve` needs clean images the training-set baseline does not hold
    criterion: Literal["size", "silhouette"] = "size"
    reduce: Literal["fastica", "pca"] = "pca"
    min_samples_per_component: int = option(5, lo=1)


def sanitizer_level(ctx: SanitizerContext, name: str, opts: ClassSanitizerOptions) -> str:
    """The feature level: `level`, or the run's model's entry in `level_by_model` when it is null."""
    if opts.level is not None:
        return opts.level
    if ctx.model_name not in opts.level_by_model:
        raise ConfigError(
            f"defense.{name}.level=null takes the layer from defense.{name}.level_by_model, which has no "
            f"entry for model={ctx.model_name!r}; set defense.{name}.level to one of {list(LEVELS)} or add the model"
        )
    return opts.level_by_model[ctx.model_name]


def ss_removal_fraction(name: str, opts: SSTrainOptions) -> float:
    """max(min_removal_fraction, removal_factor·eps): the share of every class SS removes (module
    docstring), from the defender's assumed ε alone."""
    fraction = max(opts.min_removal_fraction, opts.removal_factor * opts.eps)
    if not 0 < fraction < 1:
        raise ConfigError(
            f"defense.{name}: removal fraction max(min_removal_fraction, removal_factor * eps) = {fraction:.3f} "
            f"must be in (0, 1); lower defense.{name}.eps or removal_factor"
        )
    return fraction


@DEFENSES.register("ss_train", options=SSTrainOptions, kind=Kind.sanitizer)
def ss_keep(ctx: SanitizerContext, opts: SSTrainOptions) -> tuple[torch.Tensor, dict]:
    level, fraction = sanitizer_level(ctx, "ss_train", opts), ss_removal_fraction("ss_train", opts)
    keep = np.ones(len(ctx.y), dtype=bool)
    for rows, feats in ctx.class_features(level):
        k = n_removed(len(rows), fraction, 1.0)
        if k > 0 and len(rows) > 2:
            scores = spectral_scores(feats)
            keep[rows[np.argsort(-scores, kind="stable")[:k]]] = False
    records = [record("assumed_eps", opts.eps, level=level), record("removal_fraction", fraction, level=level)]
    return torch.from_numpy(keep), {"records": records}


@DEFENSES.register("ac_train", options=ACTrainOptions, kind=Kind.sanitizer)
def ac_keep(ctx: SanitizerContext, opts: ACTrainOptions) -> tuple[torch.Tensor, dict]:
    level = sanitizer_level(ctx, "ac_train", opts)
    keep = np.ones(len(ctx.y), dtype=bool)
    for rows, feats in ctx.class_features(level):
        if len(rows) < 4:
            continue
        c = int(ctx.y[rows[0]])
        out = detect_ac(feats, None, opts, assumed_ratio=0.0, rng=ctx.rng(f"ac_train/{c}"))
        keep[rows[out.flagged]] = False
    records = [record("n_components", float(opts.n_components), level=level, rule=opts.criterion)]
    return torch.from_numpy(keep), {"records": records}
