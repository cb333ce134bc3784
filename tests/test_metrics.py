"""Known-answer tests for the metric contract."""
import math

import numpy as np
import pytest
import torch

from bdexp import metrics


def test_accuracy_and_asr():
    assert metrics.accuracy(torch.tensor([0, 1, 2, 2]), torch.tensor([0, 1, 1, 2])) == 0.75
    assert metrics.attack_success_rate([0, 0, 3], [0, 0, 0]) == pytest.approx(2 / 3)
    assert math.isnan(metrics.accuracy([], []))


def test_tmr_requires_clean_correct_and_triggered_target():
    # sample 0: clean right, triggered -> target: counts; 1: clean wrong; 2: trigger fails
    pred_clean, y_true = [3, 1, 3], [3, 3, 3]
    pred_bd, y_tgt = [0, 0, 3], [0, 0, 0]
    assert metrics.targeted_misclassification_rate(pred_clean, y_true, pred_bd, y_tgt) == pytest.approx(1 / 3)


def test_detection_scores_and_auroc():
    labels = np.array([0, 0, 0, 1, 1])
    d = metrics.detection_scores(labels, [0, 0, 1, 1, 1])
    assert d["precision"] == pytest.approx(2 / 3) and d["recall"] == 1.0 and d["f1"] == pytest.approx(0.8)
    assert metrics.auroc(labels, [0.1, 0.2, 0.3, 0.8, 0.9]) == 1.0
    assert metrics.auroc(labels, [0.9, 0.8, 0.7, 0.2, 0.1]) == 0.0
    assert metrics.aupr(labels, [0.1, 0.2, 0.3, 0.8, 0.9]) == 1.0
    assert math.isnan(metrics.auroc([1, 1], [0.3, 0.4]))


def test_tpr95_and_best_f1():
    rng = np.random.default_rng(0)
    clean = rng.normal(0, 1, 1000)
    labels = np.r_[np.zeros(1000), np.ones(100)]
    # malicious far above every clean score: all detected at 5 % FPR
    assert metrics.tpr_at_tpr95_clean(labels, np.r_[clean, np.full(100, 10.0)]) == 1.0
    # malicious drawn like clean: about 5 % detected
    assert metrics.tpr_at_tpr95_clean(labels, np.r_[clean, rng.normal(0, 1, 100)]) < 0.15
    # exact: clean scores 0..99, the 95 % quantile is 94.05; malicious 94 (passes), 94.5, 99, 200
    exact = metrics.tpr_at_tpr95_clean(np.r_[np.zeros(100), np.ones(4)], np.r_[np.arange(100.0), 94, 94.5, 99, 200])
    assert exact == 0.75
    best = metrics.best_f1([0, 0, 1, 1, 0], [0.1, 0.2, 0.9, 0.8, 0.85])
    assert best["f1"] == pytest.approx(0.8) and best["threshold"] == pytest.approx(0.8)
    perfect = metrics.best_f1([0, 1, 1], [0.0, 0.5, 0.7])
    assert perfect["f1"] == 1.0


def test_best_f1_cuts_only_between_different_scores():
    """A threshold flags every input tied at it: with a positive and a negative tied at 0.5 the best
    reachable F1 is 2/3 (flag both), not the 1.0 of a cut inside the tie."""
    tied = metrics.best_f1([1, 0], [0.5, 0.5])
    assert tied == {"precision": 0.5, "recall": 1.0, "f1": pytest.approx(2 / 3), "threshold": 0.5}
    # 0.9 alone: P 1, R 1/2, F1 2/3; >= 0.5: P 1/2, R 1, F1 2/3 -> the first (higher) threshold
    best = metrics.best_f1([1, 0, 0, 1], [0.9, 0.5, 0.5, 0.5])
    assert best["f1"] == pytest.approx(2 / 3) and best["threshold"] == 0.9 and best["recall"] == 0.5
