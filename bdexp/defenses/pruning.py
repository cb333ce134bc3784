"""Neural Cleanse's neuron pruning with the REAL trigger (ML-MMDR §6.2, Fig. 10; SPEC §5.3).

A helper of `bdexp.defenses.nc` (registers nothing). The last conv stage's channels (the s3
feature map) are ranked by their mean activation on real-triggered inputs; for each pruning
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

from bdexp import metrics
from bdexp.data.loader import iterate_eval
from bdexp.evaluate import predict
from bdexp.results import record

# Fig. 10's x-axis: the fraction of s3 channels pruned.
DEFAULT_RATIOS = (0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)


@torch.no_grad()
def rank_channels(model: nn.Module, x: torch.Tensor, device: torch.device, batch_size: int = 256) -> torch.Tensor:
    """s3 channel indices sorted by mean activation on `x` (uint8 or float images), highest first."""
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
    for r in ratios:
        if not 0.0 <= float(r) <= 1.0:
            raise ValueError(f"nc: prune ratios must lie in [0, 1], got {r}")
        out.append(int(round(float(r) * channels)))
    return out


@torch.no_grad()
def evaluate_pruned(model: nn.Module, ranking: torch.Tensor, ratios: Sequence[float],
                    x_clean: torch.Tensor, y_clean: torch.Tensor, x_bd: torch.Tensor, y_bd: torch.Tensor,
                    device: torch.device, batch_size: int = 512) -> list[dict]:
    """BA/ASR records per ratio, pruning the first round(ratio·C) channels of `ranking`.
    The model's `s3_channel_mask` is restored to its previous value afterwards, whatever happens."""
    mask = model.s3_channel_mask
    saved = mask.detach().clone()
    rows = []
    try:
        for r, n in zip(ratios, prune_counts(ratios, mask.numel())):
            mask.copy_(saved)
            mask[ranking[:n].to(mask.device)] = 0.0
            ba = metrics.accuracy(predict(model, x_clean, device, batch_size), y_clean)
            asr = metrics.attack_success_rate(predict(model, x_bd, device, batch_size), y_bd)
            rows.append(record("ba", ba, prune_ratio=float(r)))
            rows.append(record("asr", asr, prune_ratio=float(r)))
    finally:
        mask.copy_(saved)
    return rows


def _subset(n: int, limit, rng: np.random.Generator) -> torch.Tensor:
    """All of range(n) when `limit` is None or ≥ n, else a sorted random subset of that size."""
    if limit is None or int(limit) >= n:
        return torch.arange(n)
    return torch.as_tensor(np.sort(rng.choice(n, int(limit), replace=False)), dtype=torch.long)


def pruning_curve(exp, cfg) -> list[dict]:
    """The Fig. 10 curve for an experiment: rank on `prune_images` real-triggered images, then
    BA on `eval_images` clean test images and ASR on `eval_images` backdoor test images."""
    bd = exp.backdoor_test
    batch = int(exp.cfg.get("eval_batch_size", 512))
    rank_idx = _subset(len(bd.y_target), cfg.get("prune_images", 500), exp.rng("nc/prune"))
    ranking = rank_channels(exp.model, bd.x[rank_idx], exp.device, batch)
    clean_idx = _subset(len(exp.data.y_test), cfg.get("eval_images", 2000), exp.rng("nc/eval_clean"))
    bd_idx = _subset(len(bd.y_target), cfg.get("eval_images", 2000), exp.rng("nc/eval_bd"))
    ratios = list(cfg.get("prune_ratios") or DEFAULT_RATIOS)
    return evaluate_pruned(exp.model, ranking, ratios, exp.data.x_test[clean_idx], exp.data.y_test[clean_idx],
                           bd.x[bd_idx], bd.y_target[bd_idx], exp.device, batch)
