"""The overlap-index one-class detector (OVL §III, Alg. 1–2), registered as `overlap`.

One `OverlapScorer` (bdexp.analysis.overlap) per class is fitted on the clean reserve's features of
that class (OVL §III-D3: 10 clean samples per class, features from the backdoored model); an input
is scored against the class the model predicts for it — a triggered input is predicted as the
target, and its features are then compared with clean target-class features. The scorer's value is
the overlap bound with P = the class's samples and Q = the point mass at x, higher = more in-class,
so the suspicion is its negative. The balls sit around the class mean (`center: p`, the
analysis module's **gap** choice: translation invariant) or, `center: origin`, at 0 as in OVL.

Level (`level`, default penult — our choice, the paper does not name its layer): OVL compares its
classifier with Mahalanobis/GEM/MSP "in the same feature spaces" (§III-D2/3), and those baselines
(Lee et al.; the GEM code OVL took its features from) use the penultimate features; sharing the
level with `mahalanobis` keeps Table II's comparison fair. s3 keeps the trigger's spatial footprint
(ML-MMDR: larger malicious/benign distances there) and is one override away: defense.overlap.level=s3.
"""
from __future__ import annotations

from functools import partial
from dataclasses import dataclass

import torch

from bdexp.analysis.overlap import Center, Norm, OverlapScorer  # the bound itself lives with the analyses (bdexp/analysis/overlap.py)
from bdexp.defenses import DEFENSES
from bdexp.defenses.contexts import DetectorContext, Kind
from bdexp.defenses.input_pools import InputDetectorOptions
from bdexp.defenses.screening import DetectorOutput
from bdexp.errors import ConfigError
from bdexp.models.base import Level
from bdexp.options import option


@dataclass(frozen=True)
class OverlapOptions(InputDetectorOptions):
    """conf/defense/overlap.yaml explains each value."""

    level: Level = "penult"
    norm: Norm = 2  # the ball's norm (OVL evaluates ℓ1, ℓ2, ℓ∞)
    num_radii: int = option(10, lo=1)
    center: Center = "p"


@DEFENSES.register("overlap", options=OverlapOptions, kind=Kind.input_detector, tags=lambda opts: {"level": opts.level})
def build_overlap(ctx: DetectorContext, opts: OverlapOptions):
    level = opts.level
    try:  # the scorer validates norm (1, 2, inf), num_radii and center and names the allowed values
        make = partial(OverlapScorer, norm=opts.norm, num_radii=opts.num_radii, center=opts.center)
        make()
    except ValueError as err:
        raise ConfigError(f"defense overlap: {err}") from None
    feats = ctx.view.features(ctx.reserve.x, (level,))[1][level]
    y = ctx.reserve.y
    scorers = {int(c): make().fit(feats[y == c]) for c in torch.unique(y).tolist()}

    def score(x: torch.Tensor, tag: str) -> DetectorOutput:
        logits, f = ctx.view.features(x, (level,))
        pred, f = logits.argmax(1), f[level]
        missing = sorted(set(pred.unique().tolist()) - set(scorers))
        if missing:
            raise ConfigError(f"defense overlap: no clean reserve images of predicted class(es) {missing}; "
                              "raise screening.reserve_per_class or use a larger test set")
        s = torch.empty(len(x), dtype=torch.float64)
        for c in pred.unique().tolist():
            rows = pred == c
            s[rows] = scorers[c].score(f[rows]).double().cpu()
        return DetectorOutput(-s.numpy(), None)

    return score
