"""The run as the evaluator holds it: the trained model, the data, the attack and its ground truth.

Analyses and the evaluator code of each defense kind read it. A defense never does: it gets a
narrow context (bdexp/defenses/contexts.py), and while it runs `Experiment.sealed` replaces the
run's data, attack, poisoned sets, config and scratch space by sentinels that raise
`GroundTruthRead` when read, so even a closure that captured the run cannot peek.
"""
from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import cached_property

import numpy as np
import torch
from omegaconf import DictConfig

from bdexp.attacks.base import Attack, BackdoorTestSet, PoisonedTrainSet
from bdexp.cache import ModelCache
from bdexp.data.base import ImageDataset
from bdexp.evaluate import extract, predict
from bdexp.seeding import numpy_rng


@dataclass
class Experiment:
    cfg: DictConfig
    device: torch.device
    data: ImageDataset
    attack: Attack
    train_set: PoisonedTrainSet  # x as uint8
    backdoor_test: BackdoorTestSet  # x as uint8; index = position of the clean original in the test set
    model: torch.nn.Module
    cache: ModelCache
    info: dict = field(default_factory=dict)  # shared scratch space (e.g. timings) for records

    # What `sealed` hides while a defense runs (the model and the device stay: a defender has them).
    SEALED = ("cfg", "data", "attack", "train_set", "backdoor_test", "cache", "info")

    @contextmanager
    def sealed(self, who: str):
        """While the block runs, reading any of SEALED raises GroundTruthRead naming `who`."""
        saved = {name: self.__dict__[name] for name in self.SEALED}
        cached = {k: self.__dict__.pop(k) for k in ("pred_test", "pred_backdoor", "reserve_index", "screen_index")
                  if k in self.__dict__}
        for name in self.SEALED:
            self.__dict__[name] = _Sealed(who, name)
        try:
            yield self
        finally:
            self.__dict__.update(saved)
            self.__dict__.update(cached)

    @property
    def seed(self) -> int:
        return int(self.cfg.seed)

    @property
    def target(self) -> int:
        return int(self.attack.target)

    def rng(self, tag: str) -> np.random.Generator:
        """A numpy generator for one purpose, reproducible under the run seed."""
        return numpy_rng(self.seed, tag)

    @cached_property
    def pred_test(self) -> torch.Tensor:
        """The model's predictions on the clean test set (CPU)."""
        return predict(self.model, self.data.x_test, self.device, int(self.cfg.eval_batch_size))

    @cached_property
    def pred_backdoor(self) -> torch.Tensor:
        """The model's predictions on the backdoor test set (CPU)."""
        return predict(self.model, self.backdoor_test.x, self.device, int(self.cfg.eval_batch_size))

    def features(self, x: torch.Tensor, levels=("s1", "s2", "s3", "penult")) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """(logits, {level: (n, d) float32}) of images `x` (uint8 or float), on the CPU."""
        return extract(self.model, x, self.device, tuple(levels))

    @cached_property
    def reserve_index(self) -> torch.Tensor:
        """Clean test images the defender may use as known-clean (`screening.reserve_per_class`
        per class, at most half of each class), disjoint from `screen_index`."""
        per_class = int(self.cfg.screening.reserve_per_class)
        rng = self.rng("reserve")
        y = self.data.y_test.numpy()
        keep = []
        for c in range(self.data.num_classes):
            idx = np.flatnonzero(y == c)
            take = min(per_class, len(idx) // 2)
            keep.append(rng.permutation(idx)[:take])
        return torch.as_tensor(np.sort(np.concatenate(keep)), dtype=torch.long)

    @cached_property
    def screen_index(self) -> torch.Tensor:
        """Test images not in the reserve: where screening pools and distance sets are drawn."""
        mask = torch.ones(len(self.data.y_test), dtype=torch.bool)
        mask[self.reserve_index] = False
        return mask.nonzero().flatten()


class _Sealed:
    """Stands in for a part of the run while a defense runs; any use raises GroundTruthRead."""

    def __init__(self, who: str, what: str):
        object.__setattr__(self, "_msg", f"defense {who!r} read the run's `{what}` while it ran: a defender has "
                                         "only its context (bdexp/defenses/contexts.py), never the run, the attack "
                                         "or the poison flags")

    def _raise(self, *args, **kwargs):
        from bdexp.defenses.contexts import GroundTruthRead

        raise GroundTruthRead(object.__getattribute__(self, "_msg"))

    def __getattr__(self, name):
        self._raise()

    __getitem__ = __iter__ = __len__ = __bool__ = __contains__ = __setattr__ = __call__ = _raise
