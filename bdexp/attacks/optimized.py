"""Attacks whose trigger is optimized against a clean reference model before poisoning (LF,
TrojanNN, Narcissus): the seam they share.

A subclass implements `optimize(model, x, y, device, generator) -> {name: tensor}` (the trigger's
tensors, float, on the CPU) and `apply_trigger` on `self.trigger` (those tensors, once set).
Everything else is here:

- The reference model is the run's clean reference (`AttackServices.clean_model`: train=standard
  on the unpoisoned training set, trained once and cached), the data the clean training set.
- The trigger is content-addressed (docs/attacks.md, "Learned and optimized triggers"): its key
  hashes the attack's name, the options that shape the trigger (every option but the selection
  keys `SELECTION_KEYS`, which only pick which rows get it), the reference model's *weights*
  digest, a fingerprint of the data optimized on, the seed and bdexp's version. A sweep over
  poison rates, defenses or regimes therefore optimizes it once; another reference model or other
  data gives another key. The store (`ModelCache` of kind `triggers`) verifies the key, identity
  and tensor digest of what it serves, as it does for models.
- What was optimized is recorded (`state_record`: the trigger's sha256, cache hit or miss, the
  optimization's wall time) and saved as an image (`state_images`).
"""
from __future__ import annotations

import logging
import time
from typing import ClassVar

import torch

import bdexp
from bdexp.attacks.base import Attack, AttackServices
from bdexp.cache import ModelCache, data_fingerprint, key_of, weights_digest
from bdexp.data.loader import to_float
from bdexp.seeding import derive_seed

log = logging.getLogger(__name__)

# Options that choose which rows are poisoned and how they are labelled, never the trigger.
SELECTION_KEYS = frozenset({"poison_rate", "budget", "inject", "mode", "source", "label_mode"})


class OptimizedTriggerAttack(Attack):
    """Base of attacks with a trigger optimized against a clean model (module docstring)."""

    # Options that change neither the optimization nor its result, beyond SELECTION_KEYS (e.g. a
    # test-time amplification applied after optimizing).
    not_in_trigger_key: ClassVar[frozenset[str]] = frozenset()

    trigger: dict[str, torch.Tensor] | None = None
    _record: dict | None = None

    # ---------------------------------------------------------------- subclass hooks
    def optimization_data(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The rows the optimization sees (uint8 images, labels); all of them by default
        (Narcissus: the target class only)."""
        return x, y

    def optimize(self, model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, device: torch.device,
                 generator: torch.Generator) -> dict[str, torch.Tensor]:
        """The trigger's tensors, optimized against `model` on float images `x` in [0, 1]."""
        raise NotImplementedError

    # ---------------------------------------------------------------- the seam
    def trigger_identity(self, model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> dict:
        """What the optimized trigger depends on (its cache key is `key_of` this)."""
        drop = SELECTION_KEYS | self.not_in_trigger_key
        options = {k: v for k, v in self.opts.as_dict().items() if k not in drop}
        return {"attack": self.name, "options": options, "image_shape": list(self.image_shape),
                "num_classes": self.num_classes, "reference_weights": weights_digest(model.state_dict()),
                "data": data_fingerprint(x, y), "seed": self.seed, "version": bdexp.__version__}

    def attach(self, services: AttackServices) -> None:
        if services.train_data is None:
            raise RuntimeError(f"attack {self.name!r} optimizes its trigger on the training data; "
                               "the pipeline must offer AttackServices.train_data")
        model = services.clean_model().eval()
        device = services.device()
        x, y = self.optimization_data(*services.train_data())
        cache = services.trigger_cache() if services.trigger_cache is not None else ModelCache("", enabled=False)
        identity = self.trigger_identity(model, x, y)
        key = key_of(identity)
        with cache.lock(key):
            hit = cache.get(key)
            if hit is not None:
                self.set_trigger(hit["state_dict"])
                self._record = {"trigger_cache": "hit", "trigger_key": key, **hit["meta"]}
                log.info("attack %s: optimized trigger loaded from %s", self.name, cache.path(key))
                return
            t0 = time.perf_counter()
            g = torch.Generator().manual_seed(derive_seed(self.seed, f"optimize/{self.name}"))
            with torch.enable_grad():
                tensors = self.optimize(model.to(device), to_float(x), y.long(), device, g)
            tensors = {k: v.detach().float().cpu().contiguous() for k, v in tensors.items()}
            meta = {"optimize_wall_s": time.perf_counter() - t0, "optimized_on": len(y)}
            cache.put(identity, tensors, meta)
            self.set_trigger(tensors)
            self._record = {"trigger_cache": "miss" if cache.enabled else "disabled", "trigger_key": key, **meta}
            log.info("attack %s: trigger optimized on %d images in %.1fs", self.name, len(y), meta["optimize_wall_s"])

    def set_trigger(self, tensors: dict[str, torch.Tensor]) -> None:
        self.trigger = {k: v.clone() for k, v in tensors.items()}

    def require_trigger(self) -> dict[str, torch.Tensor]:
        if self.trigger is None:
            raise RuntimeError(f"attack {self.name!r} has no trigger yet: it is optimized in `attach` "
                               "(bdexp.pipeline does this), or set one with `set_trigger`")
        return self.trigger

    def state_record(self) -> dict:
        trigger = self.require_trigger()
        return {**(self._record or {}), "trigger_sha256": weights_digest(trigger),
                "trigger_shapes": {k: list(v.shape) for k, v in trigger.items()}}
