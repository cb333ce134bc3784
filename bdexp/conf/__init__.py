"""Hydra config tree, shipped inside the package so `pip install .` finds it."""

import copy
from functools import lru_cache
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf


@lru_cache(maxsize=None)
def _node(group: str, name: str) -> dict:
    node = OmegaConf.load(Path(__file__).parent / group / f"{name}.yaml")[name]
    return OmegaConf.to_container(node, resolve=True)


def with_defaults(cfg: Any, group: str, name: str) -> dict:
    """`cfg` (a dict, a DictConfig or None) over the `name` node of conf/<group>/<name>.yaml: the
    YAML is the one place a component's defaults live, also for callers that pass a partial config."""
    own = {} if cfg is None else (OmegaConf.to_container(cfg, resolve=True) if OmegaConf.is_config(cfg) else dict(cfg))
    return {**copy.deepcopy(_node(group, name)), **own}
