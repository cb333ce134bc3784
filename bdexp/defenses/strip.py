"""STRIP (Gao et al., ACSAC 2019; OVL Table II baseline).

Superimpose each input with `n_overlay` clean images, x + x_i clipped to [0, 1] (STRIP's
cv2.addWeighted(x, 1, x_i, 1, 0); the CD authors' detection/strip.py does the same), and average
the prediction entropy H = −Σ p log p over the blends. A trigger keeps dominating the blend, so a
triggered input keeps one confident prediction: low entropy = suspicious, score = −H.

The overlays are `n_overlay` reserve images drawn with replacement once per run (the CD
authors' code draws one index set per call), so every input is blended with the same set.
Threshold rule (STRIP §V-C): flag H below the `frr`-quantile of the reserve's own entropies
(the false-rejection rate the defender accepts on clean inputs); `frr: null` = no rule.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from bdexp.defenses import DEFENSES
from bdexp.defenses.contexts import DetectorContext, Kind
from bdexp.data.loader import iterate_eval
from bdexp.defenses.input_pools import InputDetectorOptions
from bdexp.options import option
from bdexp.defenses.screening import DetectorOutput
from bdexp.errors import ConfigError

@dataclass(frozen=True)
class StripOptions(InputDetectorOptions):
    """conf/defense/strip.yaml explains each value."""

    n_overlay: int = option(100, lo=1)  # clean reserve images blended onto each input
    frr: float | None = option(0.01, lo=0, hi=1, hi_open=True)  # threshold at this FRR on the reserve; null = scores only
    batch_size: int = option(4096, lo=1)  # blended images per forward pass


@torch.no_grad()
def strip_entropy(model: nn.Module, x: torch.Tensor, overlays: torch.Tensor, device: torch.device,
                  batch_size: int) -> np.ndarray:
    """Mean prediction entropy of each image of x over its blends with every overlay; about
    `batch_size` blended images per forward pass."""
    model.eval()
    ov = overlays.to(device)
    ov = ov.float().div(255) if ov.dtype == torch.uint8 else ov.float()
    per = max(1, int(batch_size) // len(ov))  # inputs per forward
    out = []
    for xb in iterate_eval(x, per, device):
        blend = (xb[:, None] + ov[None]).clamp_(0, 1).flatten(0, 1)  # (b·n, c, h, w)
        logp = F.log_softmax(model(blend).float(), dim=1)
        h = -(logp.exp() * logp).sum(dim=1)
        out.append(h.view(len(xb), len(ov)).mean(dim=1).double().cpu())
    return torch.cat(out).numpy() if out else np.zeros(0)


@DEFENSES.register("strip", options=StripOptions, kind=Kind.input_detector)
def build_strip(ctx: DetectorContext, opts: StripOptions):
    reserve = ctx.reserve
    overlays = reserve.x[torch.as_tensor(ctx.rng("strip/overlays").integers(0, len(reserve.x), opts.n_overlay))]
    threshold = None
    if opts.frr is not None:
        clean = strip_entropy(ctx.model, reserve.x, overlays, ctx.device, opts.batch_size)
        threshold = float(np.quantile(clean, opts.frr))

    def score(x: torch.Tensor, tag: str) -> DetectorOutput:
        h = strip_entropy(ctx.model, x, overlays, ctx.device, opts.batch_size)
        flagged = None if threshold is None else h < threshold
        return DetectorOutput(-h, flagged, {"entropy_mean": float(h.mean())})

    return score
