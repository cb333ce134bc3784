"""Training done by the defender: a sanitizer's retraining and ISPL's / ITLM's inner models.

ISPL's threat model has the attacker supply poisoned data and the defender train on it ("the
attacker uses τtrain to construct the poisoned dataset for training", ISPL §3.1; "in our threat
model, the training algorithm A is fixed", App. D.2.1). So the defender trains with its own
regime (`retrain_regime` under each sanitizer's config) and only ever sees the data: a regime
whose loss reads the poison flags (`Regime.reads_poison_flags`, ML-MMDR's) is refused, and the
batches a defender's training gets carry no poison flags at all — reading `batch.poison` raises
`PoisonFlagsHidden`. Nor do they go through the attack's per-batch training hook (WaNet's noise
mode warps the rows the attacker picked, every batch: part of the attacker's training, not of
the data).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator

import torch
from omegaconf import DictConfig, OmegaConf

from bdexp.data.loader import DeviceLoader
from bdexp.errors import ConfigError
from bdexp.training.base import REGIMES


class PoisonFlagsHidden(RuntimeError):
    """A defender's training read `batch.poison`, which it must never see."""


@dataclass
class DefenderBatch:
    """A training batch without provenance: images, given labels, positions in the training set."""

    x: torch.Tensor
    y: torch.Tensor
    index: torch.Tensor

    @property
    def poison(self) -> torch.Tensor:
        raise PoisonFlagsHidden(
            "a defender's training read batch.poison: the defender does not know which rows are poisoned. "
            "The regime's loss must not use the flags; if it models the attacker, give its class "
            "`reads_poison_flags = True` so a defense refuses it up front"
        )


class DefenderLoader(DeviceLoader):
    """A DeviceLoader built without poison or cross flags and without the attack's batch hook,
    yielding `DefenderBatch`es."""

    def __init__(self, x: torch.Tensor, y: torch.Tensor, **kwargs):
        super().__init__(x, y, None, None, batch_hook=None, **kwargs)

    def __iter__(self) -> Iterator[DefenderBatch]:  # type: ignore[override]
        for batch in super().__iter__():
            yield DefenderBatch(x=batch.x, y=batch.y, index=batch.index)


def defender_regimes() -> list[str]:
    """Registered regimes a defender may train with (their loss does not read poison flags)."""
    return [n for n in REGIMES.names() if not REGIMES.get(n).reads_poison_flags]


def check_defender_regime(name: str, key: str) -> type:
    """The regime class `name`, or a ConfigError naming `key` when it is unknown or reads the
    poison flags."""
    if name is None:
        raise ConfigError(f"{key} is missing; set the regime the defender retrains with, one of "
                          f"{defender_regimes()} (standard: plain cross-entropy)")
    if str(name) not in REGIMES:
        raise ConfigError(f"{key}={name!r} is not a training regime; choose one of {defender_regimes()}")
    regime = REGIMES.get(str(name))
    if regime.reads_poison_flags:
        raise ConfigError(
            f"{key}={name}: that loss reads the poison flags (ML-MMDR Alg. 1 splits each batch into "
            f"benign and malicious rows), which only the attacker has; a defender's training cannot use "
            f"it. Choose one of {defender_regimes()}"
        )
    return regime


def regime_train_cfg(run_train: DictConfig, regime: str) -> DictConfig:
    """Regime `regime`'s declared defaults with the run's values for every key it declares: the
    run's optimiser and schedule (epochs, lr, milestones, batch size, ... as scale= and
    command-line overrides left them) under another regime's loss."""
    declared = REGIMES.options(regime)
    run = OmegaConf.to_container(run_train, resolve=True) if isinstance(run_train, DictConfig) else dict(run_train)
    return OmegaConf.create({"name": regime, **declared.defaults(),
                             **{k: v for k, v in run.items() if k in declared.fields()}})


def defender_train_cfg(run_train: DictConfig, regime: str, key: str) -> DictConfig:
    """The defender's training config: regime `regime` (checked: see `check_defender_regime`)
    with the run's optimiser schedule."""
    check_defender_regime(regime, key)
    return regime_train_cfg(run_train, str(regime))
