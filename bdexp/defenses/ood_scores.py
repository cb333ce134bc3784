"""Out-of-distribution scores as backdoor-input detectors (OVL Table I baselines; MSP and Mahalanobis are also Table II's backdoor baselines):
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

from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch
from sklearn.covariance import EmpiricalCovariance, LedoitWolf

from bdexp.defenses import DEFENSES
from bdexp.defenses.contexts import DetectorContext, Kind
from bdexp.defenses.input_pools import InputDetectorOptions
from bdexp.defenses.screening import DetectorOutput
from bdexp.models.base import Level
from bdexp.options import option

Suspicious = Literal["low_confidence", "high_confidence"]


@dataclass(frozen=True)
class MSPOptions(InputDetectorOptions):
    """conf/defense/msp.yaml explains each value."""

    suspicious: Suspicious = "low_confidence"


@dataclass(frozen=True)
class EnergyOptions(InputDetectorOptions):
    """conf/defense/energy.yaml explains each value."""

    suspicious: Suspicious = "low_confidence"
    temperature: float = option(1.0, lo=0, lo_open=True)


@dataclass(frozen=True)
class MahalanobisOptions(InputDetectorOptions):
    """conf/defense/mahalanobis.yaml explains each value."""

    level: Level = "penult"
    covariance: Literal["empirical", "ledoit_wolf"] = "empirical"


def _sign(suspicious: str) -> float:
    return 1.0 if suspicious == "low_confidence" else -1.0


def msp_suspicion(logits: torch.Tensor, sign: float = 1.0) -> np.ndarray:
    """−max softmax (sign = +1, low confidence suspicious) or +max softmax (sign = −1)."""
    return (-sign * torch.softmax(logits.double(), dim=1).max(dim=1).values).numpy()


def energy_suspicion(logits: torch.Tensor, temperature: float, sign: float = 1.0) -> np.ndarray:
    """E(x) = −T·logsumexp(f(x)/T) (sign = +1: high energy suspicious, Liu et al.) or −E(x)."""
    e = -temperature * torch.logsumexp(logits.double() / temperature, dim=1)
    return (sign * e).numpy()


def fit_mahalanobis(features: np.ndarray, labels: np.ndarray, covariance: str
                    ) -> tuple[np.ndarray, np.ndarray]:
    """(class means (C', d) of the classes present, precision (d, d)) of a tied covariance fitted to
    the class-centred features (Lee et al. §2)."""
    if covariance not in ("empirical", "ledoit_wolf"):
        raise ValueError(f"covariance={covariance!r}; choose empirical or ledoit_wolf")
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


@DEFENSES.register("msp", options=MSPOptions, kind=Kind.input_detector)
def build_msp(ctx: DetectorContext, opts: MSPOptions):
    sign = _sign(opts.suspicious)
    return lambda x, tag: DetectorOutput(msp_suspicion(ctx.view.logits(x), sign), None)


@DEFENSES.register("energy", options=EnergyOptions, kind=Kind.input_detector)
def build_energy(ctx: DetectorContext, opts: EnergyOptions):
    sign = _sign(opts.suspicious)
    return lambda x, tag: DetectorOutput(energy_suspicion(ctx.view.logits(x), opts.temperature, sign), None)


@DEFENSES.register("mahalanobis", options=MahalanobisOptions, kind=Kind.input_detector,
                   tags=lambda opts: {"level": opts.level})
def build_mahalanobis(ctx: DetectorContext, opts: MahalanobisOptions):
    level = opts.level
    feats = ctx.view.features(ctx.reserve.x, (level,))[1][level].numpy()
    means, precision = fit_mahalanobis(feats, ctx.reserve.y.numpy(), opts.covariance)

    def score(x: torch.Tensor, tag: str) -> DetectorOutput:
        return DetectorOutput(mahalanobis_min(ctx.view.features(x, (level,))[1][level].numpy(), means, precision), None)

    return score
