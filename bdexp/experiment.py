"""The run as the evaluator holds it: the trained model, the data, the attack and its ground truth.

Analyses and the evaluator code of each defense kind read it. A defense never does: it gets a
narrow context (bdexp/defenses/contexts.py), and while it runs `Experiment.sealed` takes the run's
data, attack, poisoned sets, config and scratch space out of the process's reach:

- the attributes read as sentinels that raise `GroundTruthRead`, so a closure that captured the
  run cannot peek;
- the objects themselves are serialized into opaque bytes and dropped, so no poison flag, pool
  label, clean original, triggered image or prediction on one is alive while the defense runs:
  walking the interpreter's frames or the garbage collector's objects finds none
  (tests/test_defender_view.py walks both);
- the run's config object, which Hydra's and the pipeline's frames hold, is emptied in place and
  filled again afterwards, and so is Hydra's job config but for its `hydra` node.

What is not sealed: a defense runs in bdexp's process, so it could open files (the run directory's
`.hydra/config.yaml`) or unpickle the sealed bytes on purpose. Those are a cheating defense, not a
leaking one; docs/defenses.md, "What a defender sees", says so.
"""
from __future__ import annotations

import pickle
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import cached_property

import numpy as np
import torch
from omegaconf import DictConfig

from bdexp.attacks.base import Attack, BackdoorTestSet, PoisonedTrainSet
from bdexp.cache import ModelCache, data_fingerprint
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

    # What `sealed` hides while a defense runs (the model and the device stay: a defender has them),
    # and the cached properties computed from it.
    SEALED = ("cfg", "data", "attack", "train_set", "backdoor_test", "cache", "info")
    CACHED = ("pred_test", "pred_backdoor", "reserve_index", "screen_index")
    VAULT = "_vaulted"  # __dict__ key: part name -> its pickled bytes, until the part is read again

    def __getattr__(self, name: str):
        """A part a seal left as bytes (`sealed`) is unpickled when it is next read."""
        vaulted = self.__dict__.get(Experiment.VAULT) or {}
        if name not in vaulted:
            raise AttributeError(f"{type(self).__name__!r} object has no attribute {name!r}")
        value = pickle.loads(vaulted.pop(name))
        self.__dict__[name] = value
        return value

    @contextmanager
    def sealed(self, who: str):
        """While the block runs, the run's SEALED parts are out of reach (module docstring): reading
        one raises GroundTruthRead naming `who`; afterwards they read as they were.

        Each part is pickled on its own and stays bytes until it is read again, so consecutive
        seals (a detector's pools, the defenses of a run) pickle only what was read in between:
        at CIFAR-10 size the data and poisoned sets take about a second to pickle."""
        vaulted = self.__dict__.setdefault(Experiment.VAULT, {})
        live_cfg = self.__dict__.pop("cfg")
        cached = {name: self.__dict__.pop(name) for name in self.CACHED if name in self.__dict__}
        held = _configs_held(live_cfg)  # [(a config object others hold, the keys it keeps)]
        taken = [_take_content(c, keep) for c, keep in held]  # [(key order, nodes taken out)]
        orders = [order for order, _ in taken]  # key names only
        try:
            for name in self.SEALED:
                if name != "cfg" and name in self.__dict__:
                    vaulted[name] = pickle.dumps(self.__dict__[name], protocol=pickle.HIGHEST_PROTOCOL)
                    del self.__dict__[name]
            vault = pickle.dumps({"cached": cached, "configs": [nodes for _, nodes in taken]},
                                 protocol=pickle.HIGHEST_PROTOCOL)
        except Exception:
            for (c, _), (order, nodes) in zip(held, taken):
                _put_back(c, order, nodes)
            self.__dict__.update(cached, cfg=live_cfg)
            raise
        for name in self.SEALED:
            self.__dict__[name] = _Sealed(who, name)
        _unlink(*(node for _, nodes in taken for node in nodes.values()))  # the originals go now
        del cached, taken  # nothing of the run but bytes is left in this frame
        try:
            yield self
        finally:
            opened = pickle.loads(vault)
            del vault
            for (c, _), order, nodes in zip(held, orders, opened["configs"]):
                _put_back(c, order, nodes)
            for name in self.SEALED:  # the parts read as bytes until read (__getattr__)
                del self.__dict__[name]
            self.__dict__.update(opened["cached"], cfg=live_cfg)

    @property
    def seed(self) -> int:
        return int(self.cfg.seed)

    @property
    def target(self) -> int:
        return int(self.attack.target)

    def rng(self, tag: str) -> np.random.Generator:
        """A numpy generator for one purpose, reproducible under the run seed."""
        return numpy_rng(self.seed, tag)

    def truth_rng(self, tag: str, *truth: np.ndarray | torch.Tensor) -> np.random.Generator:
        """A generator for an order a defender sees (a pool's rows), reproducible under the run seed
        and the ground truth it orders, but not by a defender who knows the seed and lacks that
        truth: with the seed alone (default 0, or read off the run directory) `rng(tag)` would let it
        recompute which positions hold the poisoned rows."""
        digest = data_fingerprint(*(torch.as_tensor(np.ascontiguousarray(part)) for part in truth))
        return numpy_rng(self.seed, f"{tag}/{digest[:16]}")

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


def _configs_held(cfg) -> list[tuple[DictConfig, tuple[str, ...]]]:
    """The config objects that hold the run's config, with the keys of each that stay while a
    defense runs: the run's own (the pipeline's and Hydra's frames hold this very object) and, under
    the CLI, Hydra's job config (its `run_job` frame holds it), whose `hydra` node stays: Hydra's
    structured configs do not survive pickling, and that node holds only what the command line
    said (docs/defenses.md, "What a defender sees")."""
    held = [(cfg, ())] if isinstance(cfg, DictConfig) else []
    try:
        from hydra.core.hydra_config import HydraConfig

        masked = HydraConfig.instance().cfg  # HydraConfig's copy of the `hydra` node, under the job config
        job = masked._get_node("hydra")._get_parent() if isinstance(masked, DictConfig) else None
    except Exception:  # noqa: BLE001 - no Hydra app around (the Python API, tests): nothing more
        job = None
    if isinstance(job, DictConfig) and job is not cfg:
        held.append((job, ("hydra",)))
    return held


def _take_content(cfg: DictConfig, keep: tuple[str, ...]) -> tuple[list[str], dict]:
    """Take the nodes of `cfg` but `keep` out of the object, in place; returns (the key order, them)."""
    content = cfg.__dict__["_content"]
    cfg.__dict__["_content"] = {k: v for k, v in content.items() if k in keep}
    taken = {k: v for k, v in content.items() if k not in keep}
    for node in taken.values():
        node._set_parent(None)  # pickled without the (emptied) parent; put back under it
    return list(content), taken


def _put_back(cfg: DictConfig, order: list[str], taken: dict) -> None:
    """Put the nodes `_take_content` took (their sealed copies) back into `cfg`, in their order."""
    kept = cfg.__dict__["_content"]
    for node in taken.values():
        node._set_parent(cfg)
    cfg.__dict__["_content"] = {k: taken[k] if k in taken else kept[k] for k in order}


def _unlink(*nodes) -> None:
    """Cut every child-to-parent link under config nodes taken out of the run: without the cycles
    those links make, the nodes and their children are freed as soon as nothing holds them, instead
    of lingering, findable, until the garbage collector's next pass."""
    for node in nodes:
        node._set_parent(None)
        content = node.__dict__.get("_content")
        _unlink(*(content.values() if isinstance(content, dict) else content if isinstance(content, list) else ()))


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
