"""Model evaluation: predictions and features in batches, and the one scorer of a model on the test
data (BA, ASR, TMR, RA records) that the run's own evaluation, the sanitizers' retrained models,
the pruning curves and the repaired models of every mitigation use."""
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


def subset_backdoor(bd, test_rows: torch.Tensor | None, rows: torch.Tensor | None = None):
    """The backdoor test set restricted to triggered copies of the clean test images `test_rows`
    (their `index` renumbered to positions in `test_rows`), or to its own `rows`; None: all of it."""
    from bdexp.attacks.base import BackdoorTestSet

    if test_rows is None and rows is None:
        return bd
    if rows is None:
        position = torch.full((int(bd.index.max()) + 1 if len(bd.index) else 0,), -1, dtype=torch.long)
        inside = test_rows[test_rows < len(position)]
        position[inside] = torch.nonzero(test_rows < len(position)).flatten()
        rows = torch.nonzero(position[bd.index] >= 0).flatten() if len(bd.index) else torch.zeros(0, dtype=torch.long)
        index = position[bd.index[rows]]
    else:
        index = bd.index[rows]
    return BackdoorTestSet(x=bd.x[rows], y_target=bd.y_target[rows], y_true=bd.y_true[rows], index=index)


def backdoor_metrics(pred_clean: torch.Tensor, y_test: torch.Tensor, pred_bd: torch.Tensor, bd,
                     which: tuple[str, ...] = ("ba", "asr", "tmr", "ra")) -> list[dict]:
    """BA on the clean test set; ASR, TMR and RA on the backdoor test set (when there is one).

    RA (robust accuracy) is the share of triggered images classified as their *true* class; every
    triggered image counts toward at most one of ASR and RA (its true class is never the target),
    so RA + ASR <= 1. `which`: the metrics wanted (pruning curves: BA and ASR)."""
    rows = [record("ba", metrics.accuracy(pred_clean, y_test))] if "ba" in which else []
    if len(bd.y_target):
        if "asr" in which:
            rows.append(record("asr", metrics.attack_success_rate(pred_bd, bd.y_target)))
        if "tmr" in which:
            rows.append(record("tmr", metrics.targeted_misclassification_rate(
                pred_clean[bd.index], bd.y_true, pred_bd, bd.y_target)))
        if "ra" in which:
            rows.append(record("ra", metrics.accuracy(pred_bd, bd.y_true)))
    return rows


def score_model(model: nn.Module, x_test: torch.Tensor, y_test: torch.Tensor, bd, device: torch.device,
                batch_size: int = 512, which: tuple[str, ...] = ("ba", "asr", "tmr", "ra")) -> list[dict]:
    """`backdoor_metrics` of `model` on clean images (x_test, y_test) and the backdoor test set `bd`
    (whose `index` points into x_test; see `subset_backdoor` for a part of the test data)."""
    pred_clean = predict(model, x_test, device, batch_size)
    pred_bd = predict(model, bd.x, device, batch_size) if len(bd.y_target) else torch.zeros(0, dtype=torch.long)
    return backdoor_metrics(pred_clean, y_test, pred_bd, bd, which)
