"""Out-of-distribution scores as backdoor-input detectors (OVL Table II baselines):
`msp`, `energy` (from the logits) and `mahalanobis` (from a feature level), all one forward pass.

Direction (decided a priori, never flipped per run): these are OOD detectors, and OVL compares
them as such, so by default they call *low confidence* suspicious, as their papers do —
MSP (Hendrycks & Gimpel 2017): suspicion = −max softmax;
energy (Liu et al. 2020): suspicion = E(x) = −T·logsumexp(f(x)/T), higher for OOD.
A backdoored model is usually *over*-confident on triggered inputs, so with this convention their
AUROC can fall below 0.5 — which is what OVL Table VII reports for MSP (e.g. 29.90 % on TCA.2) —
and it is reported as is. `suspicious: high_confidence` scores the opposite hypothesis
(suspicion = +max softmax, +T·logsumexp) for a run that wants to test it.

Mahalanobis (Lee et al. 2018): class means and one tied covariance from the clean reserve's
features (known labels); suspicion = min over classes of (x − μ_c)ᵀ Σ⁺ (x − μ_c), i.e. minus Lee
et al.'s confidence score. With 10 images per class and hundreds of feature dims Σ is singular,
so Σ⁺ is the pseudo-inverse (scikit-learn's EmpiricalCovariance, as Lee et al.'s code) or, with
`covariance: ledoit_wolf`, the inverse of the shrunk estimate.
"""
from __future__ import annotations

from typing import Any

import numpy as np
import torch
from sklearn.covariance import EmpiricalCovariance, LedoitWolf

from bdexp.options import with_defaults
from bdexp.defenses import DEFENSES
from bdexp.defenses.input_pools import Reserve, run_input_detector
from bdexp.defenses.screening import DetectorOutput
from bdexp.errors import ConfigError

DIRECTIONS = ("low_confidence", "high_confidence")
LEVELS = ("s1", "s2", "s3", "penult")
COVARIANCES = ("empirical", "ledoit_wolf")


def _sign(dcfg: dict) -> float:
    direction = str(dcfg["suspicious"])
    if direction not in DIRECTIONS:
        raise ConfigError(f"defense {dcfg.get('name')!r}: suspicious={direction!r} is not one of {list(DIRECTIONS)}")
    return 1.0 if direction == "low_confidence" else -1.0


def _level(dcfg: Any) -> str:
    level = str(with_defaults(dcfg, "defense", "mahalanobis")["level"])
    if level not in LEVELS:
        raise ConfigError(f"defense {dcfg.get('name')!r}: level={level!r} is not one of {list(LEVELS)}")
    return level


def msp_suspicion(logits: torch.Tensor, sign: float = 1.0) -> np.ndarray:
    """−max softmax (sign = +1, low confidence suspicious) or +max softmax (sign = −1)."""
    return (-sign * torch.softmax(logits.double(), dim=1).max(dim=1).values).numpy()


def energy_suspicion(logits: torch.Tensor, temperature: float = 1.0, sign: float = 1.0) -> np.ndarray:
    """E(x) = −T·logsumexp(f(x)/T) (sign = +1: high energy suspicious, Liu et al.) or −E(x)."""
    e = -temperature * torch.logsumexp(logits.double() / temperature, dim=1)
    return (sign * e).numpy()


def fit_mahalanobis(features: np.ndarray, labels: np.ndarray, covariance: str = "empirical"
                    ) -> tuple[np.ndarray, np.ndarray]:
    """(class means (C', d) of the classes present, precision (d, d)) of a tied covariance fitted to
    the class-centred features (Lee et al. §2)."""
    if covariance not in COVARIANCES:
        raise ConfigError(f"defense mahalanobis: covariance={covariance!r} is not one of {list(COVARIANCES)}")
    x = np.asarray(features, dtype=np.float64)
    classes = np.unique(labels)
    means = np.stack([x[labels == c].mean(axis=0) for c in classes])
    centred = x - means[np.searchsorted(classes, labels)]
    est = EmpiricalCovariance(assume_centered=True) if covariance == "empirical" else LedoitWolf(assume_centered=True)
    return means, est.fit(centred).precision_


def mahalanobis_min(features: np.ndarray, means: np.ndarray, precision: np.ndarray) -> np.ndarray:
    """min_c (x − μ_c)ᵀ P (x − μ_c) for every row x, as xᵀPx − 2xᵀPμ_c + μ_cᵀPμ_c."""
    x = np.asarray(features, dtype=np.float64)
    xp = x @ precision
    d = (xp * x).sum(1)[:, None] - 2 * xp @ means.T + ((means @ precision) * means).sum(1)[None, :]
    return np.maximum(d, 0.0).min(axis=1)  # clip float error below 0


def _logits(exp, x: torch.Tensor) -> torch.Tensor:
    return exp.features(x, ())[0]


def build_msp(exp, reserve: Reserve, dcfg: Any):
    sign = _sign(with_defaults(dcfg, "defense", "msp"))
    return lambda x, tag: DetectorOutput(msp_suspicion(_logits(exp, x), sign), None)


def build_energy(exp, reserve: Reserve, dcfg: Any):
    dcfg = with_defaults(dcfg, "defense", "energy")
    sign, temperature = _sign(dcfg), float(dcfg["temperature"])
    if temperature <= 0:
        raise ConfigError(f"defense energy: temperature={temperature} must be positive")
    return lambda x, tag: DetectorOutput(energy_suspicion(_logits(exp, x), temperature, sign), None)


def build_mahalanobis(exp, reserve: Reserve, dcfg: Any):
    level = _level(dcfg)
    feats = exp.features(reserve.x, (level,))[1][level].numpy()
    covariance = str(with_defaults(dcfg, "defense", "mahalanobis")["covariance"])
    means, precision = fit_mahalanobis(feats, reserve.y.numpy(), covariance)

    def score(x: torch.Tensor, tag: str) -> DetectorOutput:
        return DetectorOutput(mahalanobis_min(exp.features(x, (level,))[1][level].numpy(), means, precision), None)

    return score


@DEFENSES.register("msp")
def msp(exp, cfg) -> list[dict]:
    return run_input_detector(exp, cfg, build_msp, ("suspicious",))


@DEFENSES.register("energy")
def energy(exp, cfg) -> list[dict]:
    return run_input_detector(exp, cfg, build_energy, ("suspicious", "temperature"))


@DEFENSES.register("mahalanobis")
def mahalanobis(exp, cfg) -> list[dict]:
    return run_input_detector(exp, cfg, build_mahalanobis, ("level", "covariance"), level=_level(cfg))
