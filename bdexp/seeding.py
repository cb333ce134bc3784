"""One run seed, many independent streams: derive a reproducible seed per purpose."""
from __future__ import annotations

import zlib

import numpy as np
import torch


def derive_seed(seed: int, tag: str) -> int:
    """An independent, reproducible seed per purpose (trigger, selection, pool sampling, ...)."""
    return (int(seed) * 1_000_003 + zlib.crc32(tag.encode())) % (2**63 - 1)


def torch_generator(seed: int, tag: str) -> torch.Generator:
    return torch.Generator().manual_seed(derive_seed(seed, tag))


def numpy_rng(seed: int, tag: str) -> np.random.Generator:
    return np.random.default_rng(derive_seed(seed, tag))
