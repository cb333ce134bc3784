"""One contract for every score: plain tensors/arrays in, floats out.

Accuracy-type metrics take predictions; detection metrics take suspicion scores where higher
means more suspicious and labels where 1 = malicious (the project's convention).
"""
from __future__ import annotations

import numpy as np
import torch
from sklearn.metrics import average_precision_score, precision_recall_fscore_support, roc_auc_score, roc_curve


def _np(a) -> np.ndarray:
    return a.detach().cpu().numpy() if isinstance(a, torch.Tensor) else np.asarray(a)


def accuracy(pred, y) -> float:
    """BA when given clean test predictions; NaN on an empty set."""
    pred, y = _np(pred), _np(y)
    return float((pred == y).mean()) if len(y) else float("nan")


def attack_success_rate(pred_triggered, y_target) -> float:
    """ASR: fraction of triggered non-target inputs classified as their backdoor target."""
    return accuracy(pred_triggered, y_target)


def targeted_misclassification_rate(pred_clean, y_true, pred_triggered, y_target) -> float:
    """TMR (ISPL eq. 7): correct when clean *and* sent to the target when triggered, over the
    backdoor test set's images (source class for one-to-one, non-target for all-to-one)."""
    pc, yt, pt, yg = map(_np, (pred_clean, y_true, pred_triggered, y_target))
    return float(((pc == yt) & (pt == yg)).mean()) if len(yt) else float("nan")


def defense_effectiveness_rating(ba_before: float, asr_before: float, ba_after: float, asr_after: float) -> float:
    """DER = [max(0, ΔASR) − max(0, ΔC-Acc) + 1] / 2, Δ = undefended − defended (BackdoorBench's
    definition, Wu et al. 2022 §4.1): 0.5 when nothing changed, 1 when the ASR fell from 1 to 0 at
    no clean-accuracy cost, 0 when only the clean accuracy fell (from 1 to 0). A C-Acc *loss* lowers
    it; BackdoorBench's `utils/metric.py` adds ΔC-Acc instead, which rewards losing clean accuracy."""
    d_asr = float(asr_before) - float(asr_after)
    d_acc = float(ba_before) - float(ba_after)
    return (max(0.0, d_asr) - max(0.0, d_acc) + 1.0) / 2.0


def detection_scores(labels, flagged) -> dict[str, float]:
    """Precision, recall, F1 of a thresholded detector (malicious = positive)."""
    p, r, f, _ = precision_recall_fscore_support(_np(labels).astype(int), _np(flagged).astype(int),
                                                 average="binary", zero_division=0)
    return {"precision": float(p), "recall": float(r), "f1": float(f)}


def auroc(labels, scores) -> float:
    labels = _np(labels).astype(int)
    return float(roc_auc_score(labels, _np(scores))) if 0 < labels.sum() < len(labels) else float("nan")


def aupr(labels, scores) -> float:
    labels = _np(labels).astype(int)
    return float(average_precision_score(labels, _np(scores))) if 0 < labels.sum() < len(labels) else float("nan")


def tpr_at_tpr95_clean(labels, scores) -> float:
    """TPR95: the fraction of malicious inputs flagged when the threshold lets 95 % of the
    clean ones pass (FPR = 5 %)."""
    labels, scores = _np(labels).astype(int), _np(scores)
    if not 0 < labels.sum() < len(labels):
        return float("nan")
    threshold = np.quantile(scores[labels == 0], 0.95)
    return float((scores[labels == 1] > threshold).mean())


def best_f1(labels, scores) -> dict[str, float]:
    """F1 at the best threshold over all observed scores (SR as ML-MMDR §6.1 reports it: max-F1)."""
    labels, scores = _np(labels).astype(int), _np(scores)
    order = np.argsort(-scores, kind="stable")
    tp = np.cumsum(labels[order])
    k = np.arange(1, len(labels) + 1)
    positives = labels.sum()
    precision = tp / k
    recall = tp / max(positives, 1)
    f1 = np.where(tp > 0, 2 * precision * recall / np.maximum(precision + recall, 1e-12), 0.0)
    # Only cuts a threshold can make: "flag score >= s" takes every input tied at s, so the cut
    # must sit after the last of a group of equal scores (otherwise ties inflate the F1).
    ranked = scores[order]
    f1 = np.where(np.r_[ranked[1:] != ranked[:-1], True], f1, -1.0)
    i = int(np.argmax(f1))
    return {"precision": float(precision[i]), "recall": float(recall[i]), "f1": float(f1[i]),
            "threshold": float(scores[order][i])}


__all__ = ["accuracy", "attack_success_rate", "targeted_misclassification_rate", "detection_scores",
           "auroc", "aupr", "tpr_at_tpr95_clean", "best_f1", "roc_curve"]
