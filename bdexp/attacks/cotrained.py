"""Attacks that train their own networks together with the classifier (IAD): the seam they share.

Such an attack poisons on the fly: the classifier's loader sees the clean training set
(`training_set`), and every batch passes through `poison_batch`, which turns a share of it into
backdoor samples with the attack's current networks (gradients flow into them) and may add a loss
term of its own. The training loop (bdexp/training/loop.py) steps the attack's optimizers beside
the classifier's, saves `training_state` in its epoch checkpoints, and `fit` stores `final_state`
in the model cache beside the classifier's weights, so a resumed run and a cache hit both restore
the attack exactly as training left it.

Only once training is over does the attack produce what the evaluator needs, from its final
state: the backdoor test set (`backdoor_test`, the base class's, on `apply_trigger`) and a
*materialized* poisoned training set (`materialize`): the rows `select` picks (seeded, as for any
attack) carry the final trigger and the target label, so the sanitizers, screening pools and the
matrix score a well-defined set. That set is what a defender who retrains sees; the attacker's own
model saw freshly poisoned batches instead. docs/attacks.md, "Learned and optimized triggers".
"""
from __future__ import annotations

from typing import ClassVar

import torch
from torch import nn

from bdexp.attacks.base import Attack, PoisonedTrainSet
from bdexp.cache import weights_digest
from bdexp.data.loader import Batch


class CoTrainedAttack(Attack):
    """Base of attacks with networks trained beside the classifier (module docstring)."""

    co_trained: ClassVar[bool] = True
    nets: nn.ModuleDict  # the attack's trainable networks; subclasses build them in `build`
    _trained: bool = False  # True once training finished or a trained state was loaded

    # ---------------------------------------------------------------- before training
    def training_set(self, x: torch.Tensor, y: torch.Tensor) -> PoisonedTrainSet:
        """What the classifier's loader holds: the clean training set (poisoning is per batch)."""
        self._check_images(x, y)
        y = y.long()
        none = torch.zeros(len(y), dtype=torch.bool)
        return PoisonedTrainSet(x.clone(), y.clone(), y.clone(), none, none.clone())

    def start_training(self, device: torch.device, total_epochs: int) -> None:
        """Move the networks to `device` and build their optimizers for `total_epochs` epochs."""
        raise NotImplementedError

    def pretrain(self, loader, device: torch.device) -> None:
        """Train what must be trained before the classifier (IAD's mask network); nothing by default."""

    @property
    def pretrained(self) -> bool:
        return True

    # ---------------------------------------------------------------- during training
    def begin_epoch(self, epoch: int) -> None:
        """Set the attack's learning rates for (0-based, absolute) `epoch`."""

    def poison_batch(self, model: nn.Module, batch: Batch) -> tuple[Batch, torch.Tensor | None]:
        """The batch the classifier trains on (poisoned rows flagged in `batch.poison`) and the
        attack's own loss term (None: none)."""
        raise NotImplementedError

    def zero_grad(self) -> None:
        raise NotImplementedError

    def step(self) -> None:
        raise NotImplementedError

    def training_state(self) -> dict:
        """Everything the next epoch depends on: networks, optimizers, stage (for checkpoints)."""
        raise NotImplementedError

    def load_training_state(self, state: dict) -> None:
        raise NotImplementedError

    def end_training(self) -> None:
        """Training is over: networks to eval mode, on the CPU."""
        self.nets.eval().cpu()
        self._trained = True

    # ---------------------------------------------------------------- after training
    def final_state(self) -> dict[str, torch.Tensor]:
        """The trained networks' tensors (what the model cache stores beside the classifier)."""
        return {k: v.detach().cpu().clone() for k, v in self.nets.state_dict().items()}

    def final_state_problem(self, tensors: dict[str, torch.Tensor]) -> str | None:
        """Why a cached `final_state` does not fit the networks (None: it fits)."""
        own = self.nets.state_dict()
        if set(own) != set(tensors):
            return f"the attack's networks have {sorted(set(own) ^ set(tensors))[:3]} in one and not the other"
        for name, mine in own.items():
            if tensors[name].shape != mine.shape or tensors[name].dtype != mine.dtype:
                return f"attack tensor {name} is {tuple(tensors[name].shape)}, the network has {tuple(mine.shape)}"
            if tensors[name].is_floating_point() and not bool(torch.isfinite(tensors[name]).all()):
                return f"attack tensor {name} holds non-finite values"
        return None

    def load_final_state(self, tensors: dict[str, torch.Tensor]) -> None:
        """Load a cached `final_state` (checked by `final_state_problem`): training is over."""
        self.nets.load_state_dict(tensors)
        self.end_training()

    def require_trained(self) -> None:
        if not self._trained:
            raise RuntimeError(f"attack {self.name!r} trains its trigger with the model: its backdoor test set "
                               "and poisoned training set exist only after training (bdexp.pipeline.build_experiment)")

    def apply(self, x: torch.Tensor) -> torch.Tensor:
        self.require_trained()
        with torch.no_grad():
            return super().apply(x)

    def materialize(self, x: torch.Tensor, y: torch.Tensor) -> PoisonedTrainSet:
        """The poisoned training set, from the final state: `select`'s rows triggered and relabelled."""
        self.require_trained()
        return self.poison_train(x, y)

    def state_record(self) -> dict:
        if not self._trained:
            return {}
        return {"networks_sha256": weights_digest(self.final_state()),
                "networks_parameters": sum(p.numel() for p in self.nets.parameters()),
                "poisoned_training_set": "materialized from the final networks (bdexp/attacks/cotrained.py)"}
