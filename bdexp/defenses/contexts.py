"""What each kind of defender has (docs/defenses.md, "What a defender sees").

A defense never receives the run (`bdexp.experiment.Experiment`): the evaluator builds one of the
contexts below from it and hands the defense only that, together with the defense's own options.
Poison flags, the attack object and the attack's config stay with the evaluator. While a defense
runs, the run's ground truth is sealed (`Experiment.sealed`): reading it, through any path,
raises `GroundTruthRead` (tests/test_defender_view.py runs every registered defense that way).

Kinds (what a defense registers with: `DEFENSES.register(name, options=..., kind=...)`). A kind is
registered by its own module (`register_kind`) with its evaluator and a probe (a no-op defense of
its signature that the defender-view tests run), so adding a kind touches only that module:
- Kind.pool_detector (screening.py): `detect(features, reserve, opts, *, assumed_ratio, rng) ->
  DetectorOutput` on the features of one screening pool and of the target class's clean reserve
  (ML-MMDR §6.1);
- Kind.input_detector (input_pools.py): `build(DetectorContext, opts) -> score(x_uint8, tag) -> DetectorOutput`;
- Kind.sanitizer (sanitize.py): `keep(SanitizerContext, opts) -> (keep-mask over the training set, info)`;
- Kind.inspector (inspection.py): `inspect(InspectorContext, opts) -> InspectorOutput` (the model and the reserve);
- Kind.mitigation (mitigation.py): `repair(MitigationContext, opts) -> Repair` (a copy of the model
  and clean data -> a repaired model);
- Kind.training_time (training_time.py): `train(TrainingContext, opts) -> Repair` (the poisoned
  training set with its given labels -> a model the defender trained itself).
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field, fields
from typing import Any

import numpy as np
import torch

from bdexp.evaluate import extract, predict
from bdexp.registry import Registry
from bdexp.seeding import numpy_rng


class Kind:
    """The kinds a defense registers with; the strings are what the registry and the report use."""

    pool_detector = "pool_detector"
    input_detector = "input_detector"
    sanitizer = "sanitizer"
    inspector = "inspector"
    mitigation = "mitigation"
    training_time = "training_time"


@dataclass(frozen=True)
class KindSpec:
    """What the pipeline and the tests need to know about a defense kind."""

    evaluator: Callable[..., list[dict]]  # (exp, name, opts, fn, meta) -> records
    # probe(act) -> a defense of this kind that calls act(stage) wherever such a defense runs (stage
    # "" in its main call, e.g. "score" in a scoring function it returns) and returns a valid output
    # that changes nothing: the defender-view tests register it to look for leaks from inside.
    probe: Callable[[Callable[[str], Any]], Callable]
    options: type  # the Options a probe registers with
    probe_node: dict = field(default_factory=dict)  # config keys (beyond `name`) that keep a probe fast


# kind name -> KindSpec; filled by the modules that define the kinds (bdexp.defenses imports them all)
KINDS: Registry = Registry("defense kind")


def register_kind(name: str, evaluator: Callable[..., list[dict]], probe: Callable, options: type | None = None,
                  probe_node: dict | None = None) -> None:
    from bdexp.options import NoOptions

    KINDS.register(name)(KindSpec(evaluator, probe, options or NoOptions, dict(probe_node or {})))


class GroundTruthRead(RuntimeError):
    """A defense read the run's ground truth (poison flags, the attack, the backdoor test set's
    provenance), which no defender has."""


def sealed_call(exp, who: str, fn: Callable, *args, **kwargs):
    """`fn(*args, **kwargs)`, the defense `who`, while the run is sealed (Experiment.sealed). Each
    evaluator calls its defense through this, holding in its own frame what the defense is given
    and no label: labels are read after the defense returns."""
    with exp.sealed(who):
        return fn(*args, **kwargs)


@dataclass(frozen=True)
class Reserve:
    """The defender's clean images: true labels known, never in a pool."""

    x: torch.Tensor  # uint8 NCHW
    y: torch.Tensor  # int64 true labels
    index: np.ndarray  # positions in the clean test set


@dataclass(frozen=True)
class ModelView:
    """The frozen model as a defender uses it: predictions and features in batches."""

    model: torch.nn.Module
    device: torch.device
    eval_batch_size: int

    def features(self, x: torch.Tensor, levels=("s1", "s2", "s3", "penult")) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """(logits, {level: (n, d) float32}) of images `x` (uint8 or float), on the CPU."""
        return extract(self.model, x, self.device, tuple(levels))

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        return self.features(x, ())[0]

    def predict(self, x: torch.Tensor) -> torch.Tensor:
        return predict(self.model, x, self.device, self.eval_batch_size)


@dataclass(frozen=True)
class _Seeded:
    seed: int  # the run seed: a defense's randomness is reproducible under it

    def rng(self, tag: str) -> np.random.Generator:
        """A numpy generator for one purpose, reproducible under the run seed."""
        return numpy_rng(self.seed, tag)


@dataclass(frozen=True)
class DetectorContext(_Seeded):
    """An input detector's view: the frozen model, the clean reserve, the device."""

    view: ModelView
    reserve: Reserve
    num_classes: int

    @property
    def model(self) -> torch.nn.Module:
        return self.view.model

    @property
    def device(self) -> torch.device:
        return self.view.device


@dataclass(frozen=True)
class SanitizerContext(_Seeded):
    """A training-set sanitizer's view (ISPL §3.1): the training images with their given labels,
    the model trained on them, a trainer with the defender's own regime, and the run's schedule
    length (`scaled_epochs` turns a paper's epoch count into this run's)."""

    x: torch.Tensor  # uint8 NCHW, the training set as given
    y: torch.Tensor  # the given labels
    num_classes: int
    view: ModelView  # the model trained on (x, y)
    model_name: str  # conf/model/<name>: per-model layer tables (ISPL App. C)
    make_trainer: Callable[[], Any]  # -> ispl_core.TensorTrainer with the sanitizer's retrain_regime
    train_epochs: int  # the run's train.epochs
    reference_epochs: float  # the schedule length the paper's epoch counts assume

    def scaled_epochs(self, paper_epochs: float) -> int:
        """`paper_epochs` at this run's training length (at least 1)."""
        return max(1, round(float(paper_epochs) * self.train_epochs / float(self.reference_epochs)))

    def class_features(self, level: str):
        """(row indices, features at `level`) of each class by its given label; one class at a
        time, so wide levels (s2 of a PreActResNet-18: 16 384 dims) stay small."""
        for c in torch.unique(self.y).tolist():
            rows = (self.y == c).nonzero().flatten()
            _, feats = self.view.features(self.x[rows], levels=(level,))
            yield rows.numpy(), feats[level].numpy()


@dataclass(frozen=True)
class OracleContext(SanitizerContext):
    """The oracle baseline's view: a sanitizer's plus the poison flags. Only a defense registered
    with `reads_ground_truth=True` (the oracle, an upper bound, not a defender) receives it."""

    poison: torch.Tensor = field(default=None)  # type: ignore[assignment]


@dataclass(frozen=True)
class InspectorContext(_Seeded):
    """A model inspector's view (Neural Cleanse; ML-MMDR §6.2): the model and the clean reserve."""

    view: ModelView
    reserve: Reserve
    num_classes: int
    out_dir: Any  # where the inspector may write figures (the run directory), or None


@dataclass
class InspectorOutput:
    """What an inspector found: records about the model (no class is known to be the target), and
    per-class arrays (e.g. NC's mask ℓ1, anomaly index, flag) its evaluator scores against the truth."""

    records: list[dict]
    per_class: dict[str, np.ndarray] = field(default_factory=dict)


# Objects no context may hold: the run itself and what carries its ground truth.
def forbidden_types() -> tuple[type, ...]:
    from omegaconf import DictConfig

    from bdexp.attacks.base import Attack, BackdoorTestSet, PoisonedTrainSet
    from bdexp.experiment import Experiment

    return (Experiment, Attack, PoisonedTrainSet, BackdoorTestSet, DictConfig)


def check_context(ctx: Any) -> None:
    """Refuse a context one of whose fields is the run, its config or its ground truth."""
    bad = forbidden_types()
    for f in fields(ctx):
        value = getattr(ctx, f.name)
        if isinstance(value, bad):
            raise TypeError(f"{type(ctx).__name__}.{f.name} holds a {type(value).__name__}: a defender's "
                            "context must not reach the run, its config or its ground truth")
