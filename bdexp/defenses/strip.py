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

from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from bdexp.options import with_defaults
from bdexp.defenses import DEFENSES
from bdexp.defenses.input_pools import Reserve, float_batches, run_input_detector
from bdexp.defenses.screening import DetectorOutput
from bdexp.errors import ConfigError

KEYS = ("n_overlay", "frr", "batch_size")


@torch.no_grad()
def strip_entropy(model: nn.Module, x: torch.Tensor, overlays: torch.Tensor, device: torch.device,
                  batch_size: int = 4096) -> np.ndarray:
    """Mean prediction entropy of each image of x over its blends with every overlay; about
    `batch_size` blended images per forward pass."""
    model.eval()
    ov = overlays.to(device)
    ov = ov.float().div(255) if ov.dtype == torch.uint8 else ov.float()
    per = max(1, int(batch_size) // len(ov))  # inputs per forward
    out = []
    for _, xb in float_batches(x, per, device):
        blend = (xb[:, None] + ov[None]).clamp_(0, 1).flatten(0, 1)  # (b·n, c, h, w)
        logp = F.log_softmax(model(blend).float(), dim=1)
        h = -(logp.exp() * logp).sum(dim=1)
        out.append(h.view(len(xb), len(ov)).mean(dim=1).double().cpu())
    return torch.cat(out).numpy() if out else np.zeros(0)


def build_strip(exp, reserve: Reserve, dcfg: Any):
    dcfg = with_defaults(dcfg, "defense", "strip")
    n = dcfg["n_overlay"]
    if not isinstance(n, int) or isinstance(n, bool) or n < 1:
        raise ConfigError(f"defense strip: n_overlay={n!r} must be an int >= 1")
    frr = dcfg["frr"]
    if frr is not None and not 0.0 <= float(frr) < 1.0:
        raise ConfigError(f"defense strip: frr={frr!r} must be in [0, 1) or null")
    overlays = reserve.x[torch.as_tensor(exp.rng("strip/overlays").integers(0, len(reserve.x), n))]
    bs = int(dcfg["batch_size"])
    threshold = None
    if frr is not None:
        threshold = float(np.quantile(strip_entropy(exp.model, reserve.x, overlays, exp.device, bs), float(frr)))

    def score(x: torch.Tensor, tag: str) -> DetectorOutput:
        h = strip_entropy(exp.model, x, overlays, exp.device, bs)
        flagged = None if threshold is None else h < threshold
        return DetectorOutput(-h, flagged, {"entropy_mean": float(h.mean())})

    return score


@DEFENSES.register("strip")
def strip(exp, cfg) -> list[dict]:
    return run_input_detector(exp, cfg, build_strip, KEYS)
