"""Neural Cleanse's neuron pruning with the REAL trigger (ML-MMDR §6.2, Fig. 10).

A helper of `bdexp.defenses.nc` (registers nothing). The last conv stage's channels (the s3
feature map: the activated output the classifier head pools, so a zeroed channel is zero in
the penultimate features of every model) are ranked by their mean activation on real-triggered
inputs, read from the same masked s3 the mask acts on; for each pruning
ratio the top-activated fraction is zeroed through the model's `s3_channel_mask` buffer and
BA (clean test set) and ASR (backdoor test set) are measured. The mask is always restored.

ML-MMDR prunes with the real trigger "to rigorously test the proposed method" instead of the
reversed one (§6.2), so this curve does not depend on the trigger synthesis.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np
import torch
from torch import nn

from bdexp.attacks.base import BackdoorTestSet
from bdexp.data.loader import iterate_eval
from bdexp.errors import ConfigError
from bdexp.evaluate import score_model


@torch.no_grad()
def rank_channels(model: nn.Module, x: torch.Tensor, device: torch.device, batch_size: int) -> torch.Tensor:
    """s3 channel indices sorted by mean activation on `x` (uint8 or float images), highest first.

    The activation is the model's returned s3 (post-activation and after the current mask),
    i.e. exactly what `s3_channel_mask` zeroes; ties keep channel order."""
    model.eval()
    channels = int(model.s3_channels)
    total = torch.zeros(channels, dtype=torch.float64, device=device)
    seen = 0
    for xb in iterate_eval(x, batch_size, device):
        _, feats = model(xb, features=True)
        # s3 comes flattened (N, C·H·W); mean over positions, summed over the batch
        total += feats["s3"].view(len(xb), channels, -1).double().mean(2).sum(0)
        seen += len(xb)
    mean = (total / max(seen, 1)).cpu()
    return torch.argsort(mean, descending=True, stable=True)


def prune_counts(ratios: Sequence[float], channels: int) -> list[int]:
    """Channels pruned at each ratio: round(ratio · channels)."""
    out = []
    if len(ratios) == 0:
        raise ConfigError("defense.nc.prune_ratios is empty; list fractions in [0, 1] (or set defense.nc.prune=false)")
    for r in ratios:
        if not 0.0 <= float(r) <= 1.0:
            raise ConfigError(f"defense.nc.prune_ratios must lie in [0, 1], got {r}")
        out.append(int(round(float(r) * channels)))
    return out


@torch.no_grad()
def evaluate_pruned(model: nn.Module, ranking: torch.Tensor, ratios: Sequence[float],
                    x_clean: torch.Tensor, y_clean: torch.Tensor, x_bd: torch.Tensor, y_bd: torch.Tensor,
                    device: torch.device, batch_size: int) -> list[dict]:
    """BA/ASR records per ratio, pruning the first round(ratio·C) channels of `ranking`.
    The model's `s3_channel_mask` is restored to its previous value afterwards, whatever happens."""
    mask = model.s3_channel_mask
    saved = mask.detach().clone()
    rows = []
    try:
        for r, n in zip(ratios, prune_counts(ratios, mask.numel())):
            mask.copy_(saved)
            mask[ranking[:n].to(mask.device)] = 0.0
            rows += [{**rec, "prune_ratio": float(r)} for rec in score_model(
                model, x_clean, y_clean, BackdoorTestSet(x_bd, y_bd, y_bd, torch.zeros(len(y_bd), dtype=torch.long)),
                device, batch_size, ("ba", "asr"))]
    finally:
        mask.copy_(saved)
    return rows


def _subset(n: int, limit, rng: np.random.Generator, key: str) -> torch.Tensor:
    """All of range(n) when `limit` is None or ≥ n, else a sorted random subset of that size."""
    if limit is not None and int(limit) < 1:
        raise ConfigError(f"defense.nc.{key} must be a positive image count or null (= all), got {limit}")
    if limit is None or int(limit) >= n:
        return torch.arange(n)
    return torch.as_tensor(np.sort(rng.choice(n, int(limit), replace=False)), dtype=torch.long)


def pruning_curve(exp, opts) -> list[dict]:
    """The Fig. 10 curve for an experiment (the evaluator's: it uses the real trigger): rank on
    `prune_images` real-triggered images, then BA on `eval_images` clean test images and ASR on
    `eval_images` backdoor test images (`opts`: nc.NCOptions)."""
    bd = exp.backdoor_test
    batch = int(exp.cfg.eval_batch_size)
    rank_idx = _subset(len(bd.y_target), opts.prune_images, exp.rng("nc/prune"), "prune_images")
    ranking = rank_channels(exp.model, bd.x[rank_idx], exp.device, batch)
    clean_idx = _subset(len(exp.data.y_test), opts.eval_images, exp.rng("nc/eval_clean"), "eval_images")
    bd_idx = _subset(len(bd.y_target), opts.eval_images, exp.rng("nc/eval_bd"), "eval_images")
    ratios = list(opts.prune_ratios)
    return evaluate_pruned(exp.model, ranking, ratios, exp.data.x_test[clean_idx], exp.data.y_test[clean_idx],
                           bd.x[bd_idx], bd.y_target[bd_idx], exp.device, batch)
