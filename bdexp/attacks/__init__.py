"""Backdoor attacks (each module cites its attack's paper). One module per attack registers itself in ``ATTACKS``.

Adding an attack = one new module with an ``@ATTACKS.register("name")`` subclass of ``Attack``
whose ``Options`` (an ``AttackOptions`` subclass) declares its keys, plus ``conf/attack/<name>.yaml``
listing them (inheriting the common keys from ``conf/attack/_common.yaml``).
"""
from __future__ import annotations

from collections.abc import Mapping

from omegaconf import DictConfig

from bdexp.attacks.base import ATTACKS, Attack, BackdoorTestSet, PoisonedTrainSet, has_backdoor
from bdexp.errors import ConfigError
from bdexp.registry import import_submodules

import_submodules(__name__, __path__)

__all__ = ["ATTACKS", "Attack", "BackdoorTestSet", "PoisonedTrainSet", "build_attack", "has_backdoor"]


def build_attack(
    cfg: DictConfig | Mapping, num_classes: int, image_shape: tuple[int, int, int], seed: int
) -> Attack:
    """Build the attack named by ``cfg.name`` (validates every key; raises ConfigError)."""
    name = cfg.get("name") if cfg is not None else None
    if name is None:
        raise ConfigError(f"attack config needs a `name`; choose one of: {', '.join(ATTACKS.names())}")
    return ATTACKS.get(str(name))(cfg, num_classes=num_classes, image_shape=image_shape, seed=seed)
