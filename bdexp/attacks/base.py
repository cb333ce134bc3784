"""The attack contract: common knobs, sample selection, and the poisoned/backdoor sets.

A subclass declares its options once, in an ``AttackOptions`` subclass set as its ``Options``
(bdexp/options.py; the registry picks it up, and conf/attack/<name>.yaml lists the same defaults),
builds its trigger once in ``build`` from a seeded local generator, and implements
``apply_trigger`` (x' = G(x, b)). Everything else — the checks of the common keys that need the
run (the class count), which samples are poisoned, relabelling, replace/append injection and the
backdoor test set — lives here so every attack shares it.

How many samples are poisoned is each attack's declared `budget` (its YAML states which):
- `dataset` (ML-MMDR's and the generic attacks): n = round(ε·N) of the whole training set N, drawn
  at random among the candidates of the mode; one_to_one: n = round(ε·|source|).
- `class` (ISPL's attacks, ISPL App. B and §4.2): ε is a fraction of a class. one_to_one:
  round(ε·|source|) of the source class; all_to_one: "we poison an equal proportion of every
  non-target class such that the total amount of poison is ε times the size of the source class"
  ("an ε/9 percentage of each non-target class", §4.2), i.e. round(ε/(K−1)·|c|) of every
  non-target class c; all_to_all: "poison a ε percentage of each class", round(ε·|c|) of every
  class; label_mode=clean: round(ε·|target|) of the target class.
"""
from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import ClassVar, Literal

import torch
from omegaconf import DictConfig

from bdexp.errors import ConfigError
from bdexp.options import Options, option
from bdexp.registry import Registry
from bdexp.seeding import derive_seed

# name -> Attack subclass; the YAML's `name` key selects it (see bdexp.attacks.build_attack).
ATTACKS: Registry = Registry("attack")


Mode = Literal["all_to_one", "one_to_one", "all_to_all"]
Budget = Literal["dataset", "class"]  # what poison_rate is a fraction of (module docstring)
LabelMode = Literal["dirty", "clean"]


@dataclass(frozen=True)
class AttackOptions(Options):
    """The keys every attack takes, with the generic attacks' defaults (conf/attack/_common.yaml);
    ISPL's attacks override target/mode/budget (bdexp.attacks.scenarios.ScenarioOptions)."""

    target: int = option(0, lo=0)  # < the class count: checked by Attack, which knows it
    mode: Mode = "all_to_one"
    source: int | None = option(None, lo=0)  # one_to_one only
    poison_rate: float = option(0.1, lo=0, hi=1)  # a fraction of what `budget` says (module docstring)
    budget: Budget = "dataset"
    inject: Literal["replace", "append"] = "replace"
    label_mode: LabelMode = "dirty"


_CHUNK = 4096  # images per apply_trigger call: bounded memory on full CIFAR-size sets


@dataclass
class PoisonedTrainSet:
    """The training set the model sees. `poison`/`y_true` are for the evaluator only."""

    x: torch.Tensor  # float NCHW in [0, 1] from poison_train; uint8 after pipeline.prepare (to_uint8)
    y: torch.Tensor  # labels given to the learner (relabelled where dirty-label poisoned)
    y_true: torch.Tensor  # original labels
    poison: torch.Tensor  # bool: carries the trigger
    cross: torch.Tensor  # bool: rows changed per batch, labels kept (WaNet noise mode, BppAttack negatives, IAD cross)
    # bool: "cover" samples (Adap-Blend/Adap-Patch, Qi et al. 2023 §4): they carry a trigger but
    # keep their true label, so they are not poison (no label was changed); None = the attack has none
    cover: torch.Tensor | None = None


@dataclass
class BackdoorTestSet:
    """Triggered test images and the label the attacker wants for each."""

    x: torch.Tensor  # triggered float NCHW from backdoor_test; uint8 after pipeline.prepare
    y_target: torch.Tensor
    y_true: torch.Tensor
    index: torch.Tensor  # int64 indices into the clean test set


def apportion(quotas: list[float]) -> list[int]:
    """Integer counts for fractional per-group quotas whose total is round(sum(quotas)): every
    group gets floor(quota), the rest goes one each to the largest remainders (ties: group order).
    Rounding each group alone drifts the total (CIFAR-10 all-to-one at ε = 5 %: 9 × round(27.8) =
    252 instead of ISPL App. B's "total amount of poison ... ε times the size of the source class",
    250) and sends every small class to 0 or 1 alike."""
    floors = [math.floor(q + 1e-9) for q in quotas]
    left = int(round(sum(quotas))) - sum(floors)
    order = sorted(range(len(quotas)), key=lambda i: (-(quotas[i] - floors[i]), i))
    for i in order[:max(left, 0)]:
        floors[i] += 1
    return floors


@dataclass(frozen=True)
class AttackServices:
    """What the pipeline offers an attack before it poisons (`Attack.attach`), each computed only
    when called: the run's device, a model trained on the unpoisoned training set (trained or
    loaded from the cache), the clean training set (uint8 images, labels) and the store where an
    optimized trigger is kept by content (bdexp/attacks/optimized.py); None: not offered."""

    device: Callable[[], torch.device]
    clean_model: Callable[[], torch.nn.Module]
    train_data: Callable[[], tuple[torch.Tensor, torch.Tensor]] | None = None
    trigger_cache: Callable[[], object] | None = None  # -> bdexp.cache.ModelCache of kind "triggers"


class Attack:
    """Base class. Subclasses set ``name``/``Options`` and implement ``apply_trigger``."""

    name: ClassVar[str] = ""
    Options: ClassVar[type[AttackOptions]] = AttackOptions  # the declaration; the registry reads it
    poisons: ClassVar[bool] = True  # False only for the `none` attack
    # True: the attack trains networks with the classifier and poisons per batch
    # (bdexp/attacks/cotrained.py); its sets exist only after training
    co_trained: ClassVar[bool] = False

    def __init__(self, cfg: Mapping | DictConfig, num_classes: int, image_shape: tuple[int, int, int], seed: int):
        if len(tuple(image_shape)) != 3:
            raise ValueError(f"image_shape must be (C, H, W), got {image_shape}")
        self.num_classes = int(num_classes)
        self.image_shape: tuple[int, int, int] = tuple(int(s) for s in image_shape)  # type: ignore[assignment]
        self.seed = int(seed)
        name = cfg.get("name") if cfg is not None else None
        if name is not None and name != self.name:
            raise ConfigError(f"attack.name={name!r} but the {self.name!r} attack was built")
        self.opts = self.resolve(self.Options.parse(cfg, "attack"))
        self._validate_common()
        o = self.opts
        self.target: int = o.target
        self.mode: str = o.mode
        self.source: int | None = o.source
        self.poison_rate: float = o.poison_rate
        self.budget: str = o.budget
        self.inject: str = o.inject
        self.label_mode: str = o.label_mode
        self.build(torch.Generator().manual_seed(derive_seed(self.seed, f"trigger/{self.name}")))

    # ---------------------------------------------------------------- validation
    def resolve(self, opts: AttackOptions) -> AttackOptions:
        """The options with what they imply filled in (ISPL's scenario: target/source); identity here."""
        return opts

    def _validate_common(self) -> None:
        """What the declaration cannot check: class indices against the class count, and the
        combinations of mode, source and label_mode."""
        o, k = self.opts, self.num_classes
        if not 0 <= o.target < k:
            raise ConfigError(f"attack.target={o.target} is not allowed: use a class index in 0..{k - 1} "
                              f"(the dataset has {k} classes)")
        src = o.source
        if o.mode == "one_to_one":
            if src is None:
                raise ConfigError("attack.mode=one_to_one needs attack.source (an int class index); got null")
            if not 0 <= src < k:
                raise ConfigError(f"attack.source={src} is not allowed: use a class index in 0..{k - 1} "
                                  f"(the dataset has {k} classes)")
            if src == o.target:
                raise ConfigError(f"attack.source={src} equals attack.target; they must differ for one_to_one")
        elif src is not None:
            raise ConfigError(
                f"attack.source={src!r} is only used with mode=one_to_one (mode={o.mode!r}); set it to null"
            )
        if o.label_mode == "clean" and o.mode == "all_to_all":
            raise ConfigError(
                "attack.label_mode=clean cannot be combined with mode=all_to_all "
                "(clean label poisons only target-class samples); use all_to_one or one_to_one"
            )

    # ---------------------------------------------------------------- subclass hooks
    def attach(self, services: AttackServices) -> None:
        """Called once before poisoning with what the run can provide on demand (e.g. clbd's clean
        reference model); the default needs nothing."""

    def build(self, generator: torch.Generator) -> None:
        """Validate attack-specific options and build the fixed trigger (override)."""

    def apply_trigger(self, x: torch.Tensor) -> torch.Tensor:
        """G(x, b): float NCHW in [0, 1] in and out, vectorized (override)."""
        raise NotImplementedError

    def trigger_mask(self) -> torch.Tensor | None:
        """(H, W) bool mask of the pixels the trigger may change; None for a global trigger."""
        return None

    def train_batch_hook(
        self, x: torch.Tensor, cross: torch.Tensor, generator: torch.Generator | None = None
    ) -> torch.Tensor:
        """Per-batch randomness (WaNet noise mode). Identity by default."""
        return x

    def select_cross(self, poison: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """Bool mask of noise-mode samples in the final training set (none by default)."""
        return torch.zeros_like(poison)

    @staticmethod
    def draw_unpoisoned(poison: torch.Tensor, n: int, generator: torch.Generator, asked: str) -> torch.Tensor:
        """Bool mask of `n` rows drawn without replacement among the non-poisoned ones (the
        `cross` rows of WaNet's noise mode, BppAttack's negatives, IAD's cross-trigger rows);
        `asked` names the option that asked for them, for the error when too few exist."""
        cross = torch.zeros_like(poison)
        clean = (~poison).nonzero().flatten()
        if n > len(clean):
            raise ConfigError(f"{asked} asks for {n} rows that are not poisoned but only {len(clean)} exist; "
                              "lower it or attack.poison_rate")
        cross[clean[torch.randperm(len(clean), generator=generator)[:n]]] = True
        return cross

    # ---------------------------------------------------------------- what the run records
    def state_record(self) -> dict:
        """What was drawn or optimized, for results.json (`attack_state`): digests of a learned
        trigger or generator, where it came from (cache hit/miss), its cost. Empty for a fixed
        trigger."""
        return {}

    def state_images(self) -> dict[str, torch.Tensor]:
        """Images worth saving beside the results (name -> float CHW in [0, 1]): an optimized
        trigger, a mask. The pipeline writes each as `attack_<name>.png`."""
        return {}

    # ---------------------------------------------------------------- shared logic
    def apply(self, x: torch.Tensor) -> torch.Tensor:
        """apply_trigger in bounded-size chunks."""
        if len(x) <= _CHUNK:
            return self.apply_trigger(x)
        return torch.cat([self.apply_trigger(chunk) for chunk in x.split(_CHUNK)])

    def _check_images(self, x: torch.Tensor, y: torch.Tensor) -> None:
        if x.dim() != 4 or tuple(x.shape[1:]) != self.image_shape:
            raise ValueError(f"attack {self.name!r} expects images of shape (N, {self.image_shape}), got {tuple(x.shape)}")
        if len(x) != len(y):
            raise ValueError(f"{len(x)} images but {len(y)} labels")

    def new_labels(self, y: torch.Tensor) -> torch.Tensor:
        """The label a poisoned sample is given (clean label: unchanged)."""
        if self.label_mode == "clean":
            return y.clone()
        if self.mode == "all_to_all":
            return (y + 1) % self.num_classes
        return torch.full_like(y, self.target)

    @property
    def budget_rule(self) -> str:
        """The selection rule this attack uses, in words (recorded in the run info)."""
        if not self.poisons:
            return "none"
        if self.budget == "class":
            if self.label_mode == "clean":
                return f"class: round(eps*|c|) of the target class {self.target}"
            return {"one_to_one": f"class: round(eps*|c|) of the source class {self.source}",
                    "all_to_one": f"class: eps/(K-1)*|c| of each non-target class (K={self.num_classes}), "
                                  "largest remainders",
                    "all_to_all": "class: eps*|c| of every class, largest remainders"}[self.mode]
        if self.mode == "one_to_one":
            return f"dataset: round(eps*|c|) of the source class {self.source}"
        pool = {"clean": "target-class", "dirty": "non-target" if self.mode == "all_to_one" else "any"}
        return f"dataset: round(eps*N) of the training set, drawn among {pool[self.label_mode]} samples"

    def quotas(self, y: torch.Tensor) -> list[tuple[torch.Tensor, int]]:
        """(candidate indices, how many of them to poison) per group, by the `budget` rule (see the
        module docstring). One group for `dataset`; one per poisoned class for `class`."""
        rate, k = self.poison_rate, self.num_classes
        if self.budget == "class":
            if self.label_mode == "clean":
                classes, share = [self.target], rate
            elif self.mode == "one_to_one":
                classes, share = [self.source], rate
            elif self.mode == "all_to_one":  # ISPL §4.2: "an ε/9 percentage of each non-target class"
                classes, share = [c for c in range(k) if c != self.target], rate / (k - 1)
            else:  # all_to_all, ISPL App. B: "poison a ε percentage of each class"
                classes, share = list(range(k)), rate
            groups = [(y == c).nonzero().flatten() for c in classes]
            return list(zip(groups, apportion([share * len(g) for g in groups])))
        if self.label_mode == "clean":
            candidates = (y == self.target).nonzero().flatten()
        elif self.mode == "all_to_one":
            candidates = (y != self.target).nonzero().flatten()
        elif self.mode == "one_to_one":
            candidates = (y == self.source).nonzero().flatten()
        else:
            candidates = torch.arange(len(y))
        base = int((y == self.source).sum()) if self.mode == "one_to_one" else len(y)
        return [(candidates, int(round(rate * base)))]

    def select(self, y: torch.Tensor) -> torch.Tensor:
        """Sorted indices of the training samples to poison: `quotas` drawn without replacement
        by a generator seeded from the run seed (one draw per group, in group order)."""
        groups = self.quotas(y)
        if self.poison_rate > 0 and sum(n for _, n in groups) == 0:
            raise ConfigError(
                f"attack.poison_rate={self.poison_rate} rounds to 0 poisoned samples under "
                f"attack.budget={self.budget} ({self.budget_rule}; candidate group sizes "
                f"{[len(c) for c, _ in groups]}); raise poison_rate or use more data"
            )
        for candidates, n in groups:
            if n > len(candidates):  # only the dataset budget can ask for more than a group holds
                raise ConfigError(
                    f"attack.poison_rate={self.poison_rate} asks for {n} poisoned samples ({self.budget_rule}) "
                    f"but only {len(candidates)} samples can be poisoned (label_mode={self.label_mode}, "
                    f"mode={self.mode}); the largest feasible rate is "
                    f"{self.poison_rate * len(candidates) / n:.4f}"
                )
        g = torch.Generator().manual_seed(derive_seed(self.seed, "select"))
        chosen = [c[torch.randperm(len(c), generator=g)[:n]] for c, n in groups]
        return torch.cat(chosen).sort().values

    def poison_train(self, x: torch.Tensor, y: torch.Tensor) -> PoisonedTrainSet:
        """Poison a training set: replace in place or append poisoned copies (`inject`)."""
        self._check_images(x, y)
        y = y.long()
        if not self.poisons:
            none = torch.zeros(len(y), dtype=torch.bool, device=y.device)
            return PoisonedTrainSet(x.clone(), y.clone(), y.clone(), none, none.clone())
        idx = self.select(y.cpu()).to(y.device)
        x_bd = self.apply(x[idx])
        y_bd = self.new_labels(y[idx])
        if self.inject == "replace":
            x_out, y_out, y_true = x.clone(), y.clone(), y.clone()
            x_out[idx] = x_bd
            y_out[idx] = y_bd
            poison = torch.zeros(len(y), dtype=torch.bool, device=y.device)
            poison[idx] = True
        else:  # append: the originals stay clean, poisoned copies go at the end
            x_out = torch.cat([x, x_bd])
            y_out = torch.cat([y, y_bd])
            y_true = torch.cat([y, y[idx]])
            poison = torch.cat([torch.zeros(len(y), dtype=torch.bool), torch.ones(len(idx), dtype=torch.bool)])
            poison = poison.to(y.device)
        g = torch.Generator().manual_seed(derive_seed(self.seed, "cross"))
        cross = self.select_cross(poison.cpu(), g).to(poison.device)
        return PoisonedTrainSet(x_out, y_out, y_true, poison, cross)

    def backdoor_test(self, x: torch.Tensor, y: torch.Tensor) -> BackdoorTestSet:
        """Triggered copies of every test image the attack targets (non-target; one_to_one: source class)."""
        self._check_images(x, y)
        y = y.long()
        if not self.poisons:
            empty = torch.zeros(0, dtype=torch.long, device=y.device)
            return BackdoorTestSet(x[:0].clone(), empty, empty.clone(), empty.clone())
        if self.mode == "all_to_all":
            keep = torch.ones(len(y), dtype=torch.bool, device=y.device)
        elif self.mode == "one_to_one":
            keep = y == self.source
        else:
            keep = y != self.target
        index = keep.nonzero().flatten()
        y_true = y[index]
        if self.mode == "all_to_all":
            y_target = (y_true + 1) % self.num_classes
        else:
            y_target = torch.full_like(y_true, self.target)
        return BackdoorTestSet(self.apply(x[index]), y_target, y_true, index)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.opts}, seed={self.seed})"


def has_backdoor(attack: Attack | None) -> bool:
    """Whether a run with `attack` has a backdoor to measure: the one check every evaluator,
    regime and analysis asks (attack=none, or no attack at all, has none)."""
    return attack is not None and bool(getattr(attack, "poisons", True))
