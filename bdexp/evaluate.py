"""Model evaluation: predictions and features in batches, and BA / ASR / TMR records."""
from __future__ import annotations

import torch
from torch import nn

from bdexp import metrics
from bdexp.data.loader import iterate_eval
from bdexp.results import record


@torch.no_grad()
def predict(model: nn.Module, x: torch.Tensor, device: torch.device, batch_size: int = 512) -> torch.Tensor:
    """Arg-max predictions (on CPU) for uint8 or float images."""
    model.eval()
    out = [model(xb).argmax(1).cpu() for xb in iterate_eval(x, batch_size, device)]
    return torch.cat(out) if out else torch.zeros(0, dtype=torch.long)


@torch.no_grad()
def extract(model: nn.Module, x: torch.Tensor, device: torch.device, levels=("s1", "s2", "s3", "penult"),
            batch_size: int = 256) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Logits and flattened features at `levels` (float32, on CPU) from one forward per batch."""
    model.eval()
    logits, feats = [], {lv: [] for lv in levels}
    for xb in iterate_eval(x, batch_size, device):
        lg, fs = model(xb, features=True)
        logits.append(lg.float().cpu())
        for lv in levels:
            feats[lv].append(fs[lv].float().cpu())
    return torch.cat(logits), {lv: torch.cat(v) for lv, v in feats.items()}


def backdoor_metrics(pred_clean: torch.Tensor, y_test: torch.Tensor, pred_bd: torch.Tensor, bd) -> list[dict]:
    """BA on the clean test set; ASR and TMR on the backdoor test set (when there is one)."""
    rows = [record("ba", metrics.accuracy(pred_clean, y_test))]
    if len(bd.y_target):
        rows.append(record("asr", metrics.attack_success_rate(pred_bd, bd.y_target)))
        rows.append(record("tmr", metrics.targeted_misclassification_rate(
            pred_clean[bd.index], bd.y_true, pred_bd, bd.y_target)))
    return rows
