"""What the defenses that produce a model share: the defender's training tools (`Repairer`), the
output (`Repair`), the repaired-model cache and the scoring (C-Acc, ASR, RA, DER) against the run's
own, undefended model. Two kinds build on it: mitigation.py (post-training repair of a copy of
the suspect model) and training_time.py (a model the defender trains itself on the poisoned set).

Scoring (docs/defenses.md, "Repair defenses"): C-Acc is the record `ba` (as for the run's own
model), ASR the share of non-target triggered test images sent to the target, RA the share
classified as their true class, and DER = [max(0, ΔASR) − max(0, ΔC-Acc) + 1] / 2 with
Δ = undefended − defended (`metrics.defense_effectiveness_rating`), all on test images the defender
never saw, with the same scorer as the run's own evaluation (bdexp/evaluate.py).

A repaired model is an artifact of the model cache (bdexp/cache.py), keyed by the suspect model
(its weights digest and key), the defense and its options, the defender's data (a fingerprint of
the tensors) and the seed: a sweep over attacks × mitigations repairs each model once, and a
stored repair is verified like a trained model before it is served. An interrupted repair resumes:
`Repairer.finetune` and `Repairer.epochs` checkpoint every epoch under the repair's key.
"""
from __future__ import annotations

import copy
import dataclasses
import logging
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from omegaconf import OmegaConf
from torch import nn

import bdexp
from bdexp import metrics
from bdexp.cache import key_of, weights_digest
from bdexp.data.loader import DeviceLoader
from bdexp.defenses.contexts import ModelView, _Seeded
from bdexp.evaluate import backdoor_metrics, predict, score_model, subset_backdoor
from bdexp.jobs import deferred
from bdexp.progress import make_progress
from bdexp.results import record
from bdexp.seeding import derive_seed
from bdexp.training.base import Schedule
from bdexp.training.defender import DefenderLoader
from bdexp.training.loop import Optimization, train_model

log = logging.getLogger(__name__)


@dataclass
class Repair:
    """What a repair defense returns: its model, its cost in model-epochs (one epoch of one model
    over the defender's data counts 1), extra records (e.g. the channels pruned) and, for a
    training-time defense, the rows it isolated as suspect (a bool mask over its context's rows)."""

    model: nn.Module
    model_epochs: float = 0.0
    records: list[dict] = field(default_factory=list)
    isolated: torch.Tensor | None = None


class CrossEntropy:
    """The plain loss `Repairer.finetune` trains with unless given another (any object with
    `loss(model, batch) -> (loss, logits)`; `begin_epoch` / `epoch_stats` are optional)."""

    def loss(self, model: nn.Module, batch) -> tuple[torch.Tensor, torch.Tensor]:
        logits = model(batch.x)
        return nn.functional.cross_entropy(logits, batch.y), logits


class _LoopRegime:
    """Adapts a loss object to what training/loop.py calls."""

    def __init__(self, loss):
        self._loss = loss

    def loss(self, model, batch):
        return self._loss.loss(model, batch)

    def begin_epoch(self) -> None:
        getattr(self._loss, "begin_epoch", lambda: None)()

    def epoch_stats(self) -> dict[str, float]:
        return getattr(self._loss, "epoch_stats", dict)()


@dataclass(frozen=True)
class Repairer(_Seeded):
    """The training tools of a defender that produces a model, on its own data (x, y): loaders with
    the run's augmentation, fine-tuning through the shared loop, resumable epochs for custom loops,
    the run's optimiser schedule and its length (`scaled_epochs` turns a paper's epoch count into
    this run's, as for the sanitizers)."""

    x: torch.Tensor  # uint8 NCHW: the defender's images
    y: torch.Tensor  # their labels (true labels for a mitigation's clean data, given labels for a training-time defense)
    num_classes: int
    device: torch.device
    eval_batch_size: int
    schedule: Schedule  # the run's optimiser settings (batch size, momentum, weight decay, lr, epochs)
    crop_padding: int
    flip: bool
    train_epochs: int  # the run's train.epochs
    reference_epochs: float  # the schedule length the paper's epoch counts assume
    checkpoints: Callable[[str], Path | None]  # tag -> where a resumable stage keeps its state (None: nowhere)

    def scaled_epochs(self, paper_epochs: float) -> int:
        """`paper_epochs` at this run's training length (at least 1)."""
        return max(1, round(float(paper_epochs) * self.train_epochs / float(self.reference_epochs)))

    def view(self, model: nn.Module) -> ModelView:
        return ModelView(model, self.device, self.eval_batch_size)

    def loader(self, tag: str, batch_size: int | None = None, rows: torch.Tensor | None = None,
               augment: bool = True, drop_last: bool = False, x: torch.Tensor | None = None,
               y: torch.Tensor | None = None) -> DeviceLoader:
        """Shuffled batches of the defender's data (or of `x`, `y`; only `rows` of them), with the
        run's crop and flip unless `augment=False`, seeded by the run seed and `tag`."""
        x = self.x if x is None else x
        y = self.y if y is None else y
        if rows is not None:
            x, y = x[rows], y[rows]
        return DefenderLoader(x, y, batch_size=int(batch_size or self.schedule.batch_size), device=self.device,
                              seed=derive_seed(self.seed, tag), drop_last=drop_last,
                              crop_padding=self.crop_padding if augment else 0, flip=self.flip and augment)

    def accuracy(self, model: nn.Module, x: torch.Tensor | None = None, y: torch.Tensor | None = None) -> float:
        """Accuracy of `model` on the defender's data (or on `x`, `y`)."""
        x = self.x if x is None else x
        y = self.y if y is None else y
        return metrics.accuracy(predict(model, x, self.device, self.eval_batch_size), y)

    def finetune(self, model: nn.Module, epochs: int, tag: str, lr: float | None = None, loss=None,
                 batch_size: int | None = None, milestones: tuple[float, ...] | None = (),
                 weight_decay: float | None = None, rows: torch.Tensor | None = None,
                 x: torch.Tensor | None = None, y: torch.Tensor | None = None, schedule: str = "step") -> dict:
        """Train `model` in place for `epochs` epochs on the defender's data (or `x`, `y`, `rows`)
        with SGD at the run's momentum and weight decay and `lr` (default: the run's), constant
        unless `milestones` (fractions of `epochs`; None: the run's) or `schedule="cosine"`
        (training/loop.py), through the shared loop
        (progress bar, history, a checkpoint every epoch: an interrupted fine-tune resumes).
        `loss`: an object with `loss(model, batch) -> (loss, logits)`, default cross-entropy."""
        sched = dataclasses.replace(
            self.schedule, epochs=int(epochs), lr=float(lr if lr is not None else self.schedule.lr),
            batch_size=int(batch_size or self.schedule.batch_size),
            milestones=self.schedule.milestones if milestones is None else tuple(milestones),
            weight_decay=self.schedule.weight_decay if weight_decay is None else float(weight_decay))
        loader = self.loader(tag, sched.batch_size, rows=rows, x=x, y=y, drop_last=True)
        optimization = Optimization(model, sched, schedule=schedule)
        history = train_model(model, loader, _LoopRegime(loss or CrossEntropy()), sched, self.device,
                              describe=tag, checkpoint=self.checkpoints(tag), optimization=optimization)
        model.eval()
        return history

    def epochs(self, tag: str, n: int, *state: Any) -> Iterator[int]:
        """Epoch numbers 0..n-1 for a defense's own loop, with a progress bar. After each epoch the
        `state` (models, optimizers: anything with state_dict/load_state_dict; loaders: their
        shuffling generator) and torch's RNG are saved; a re-run resumes after the last saved epoch."""
        path = self.checkpoints(tag)
        start = _resume(path, state) if path is not None and path.exists() else 0
        with make_progress() as progress:
            task = progress.add_task(tag, total=int(n), completed=start, info="")
            for epoch in range(start, int(n)):
                yield epoch
                if path is not None:
                    _save(path, epoch + 1, state)
                progress.advance(task)


def _state_of(obj: Any):
    return obj.generator.get_state() if isinstance(obj, DeviceLoader) else obj.state_dict()


def _save(path: Path, epochs_done: int, state: tuple) -> None:
    from bdexp.cache import atomic_torch_save

    blob = {"key": path.stem, "epoch": epochs_done, "state": [_state_of(s) for s in state],
            "torch_rng": torch.get_rng_state()}
    path.parent.mkdir(parents=True, exist_ok=True)
    with deferred():
        atomic_torch_save(blob, path)


def _resume(path: Path, state: tuple) -> int:
    """Load a `_save` file into `state`; returns the epochs it holds (0, with a warning, when it
    does not fit: all or nothing, the objects keep their fresh state)."""
    before = [copy.deepcopy(_state_of(s)) for s in state]
    try:
        blob = torch.load(path, map_location="cpu", weights_only=True)
        if blob.get("key") != path.stem or len(blob["state"]) != len(state):
            raise ValueError(f"it is not a checkpoint of {path.stem}")
        for obj, saved in zip(state, blob["state"]):
            if isinstance(obj, DeviceLoader):
                obj.generator.set_state(saved)
            else:
                obj.load_state_dict(saved)
        torch.set_rng_state(blob["torch_rng"])
        log.info("%s: resumed after epoch %d", path.stem, int(blob["epoch"]))
        return int(blob["epoch"])
    except Exception as err:  # noqa: BLE001 - a checkpoint of another shape/version: start over
        for obj, saved in zip(state, before):
            if isinstance(obj, DeviceLoader):
                obj.generator.set_state(saved)
            else:
                obj.load_state_dict(saved)
        log.warning("cannot resume from %s (%s); starting this stage over", path, err)
        return 0


def repairer_fields(exp, x: torch.Tensor, y: torch.Tensor, key: str) -> dict:
    """The `Repairer` fields of a run: the defender's data (x, y), the run's schedule and device;
    checkpoints under the repair's cache `key`."""
    cfg, cache = exp.cfg, exp.cache

    def checkpoints(tag: str) -> Path | None:
        return cache.checkpoint_path(f"{key}.{tag.replace('/', '_').replace(' ', '_')}")

    return dict(seed=exp.seed, x=x, y=y, num_classes=exp.data.num_classes, device=exp.device,
                eval_batch_size=int(cfg.eval_batch_size), schedule=Schedule.of(cfg.train),
                crop_padding=int(cfg.dataset.augment.crop_padding), flip=bool(cfg.dataset.augment.flip),
                train_epochs=int(cfg.train.epochs), reference_epochs=float(cfg.sanitizer_reference_epochs),
                checkpoints=checkpoints)


def repair_identity(exp, kind: str, name: str, opts, data: str, suspect: bool = True, **more: Any) -> dict:
    """What a repaired model depends on: the suspect model (weights digest and cache key; not for a
    defense that trains its own model, `suspect=False`), the defense and its options, the
    defender's data (`data`: its fingerprint), the run's schedule, augmentation and schedule
    length, the seed and the bdexp version."""
    cfg = exp.cfg
    model = ({"suspect": weights_digest(exp.model.state_dict()), "suspect_key": exp.info.get("model_key")} if suspect
             else {"model": OmegaConf.to_container(cfg.model, resolve=True)})
    return {"kind": kind, "defense": name, "options": opts.as_dict(), "data": data, **model,
            "schedule": Schedule.of(cfg.train).as_dict(), "reference_epochs": float(cfg.sanitizer_reference_epochs),
            "augment": {"crop_padding": int(cfg.dataset.augment.crop_padding), "flip": bool(cfg.dataset.augment.flip)},
            "seed": exp.seed, "version": bdexp.__version__, **more}


def cached_repair(exp, name: str, identity: dict, produce: Callable[[], Repair]) -> tuple[nn.Module, dict, bool]:
    """(the repaired model, its meta {wall_s, model_epochs, records, isolated}, whether it came
    from the cache): `produce()` runs only when the cache holds no verified model of `identity`.
    The model `produce` returns must fit the run's architecture exactly (`load_strictly`): what is
    scored is what is stored. The run's own model is the same, byte for byte, afterwards (checked;
    a defense that changed it is an error, and its weights are put back)."""
    from bdexp.training.fit import load_strictly

    cache, key = exp.cache, key_of(identity)
    own_digest = weights_digest(exp.model.state_dict())
    own_state = {k: v.detach().clone() for k, v in exp.model.state_dict().items()}
    with cache.lock(key):
        hit = cache.get(key)
        model = copy.deepcopy(exp.model).eval()
        if hit is not None:
            problem = load_strictly(model, hit["state_dict"])
            if problem is None:
                log.info("%s: loaded the repaired model %s (no repair run)", name, cache.path(key))
                return model, dict(hit["meta"]), True
            cache.set_aside(key, f"{name}: does not fit the model: {problem}")
        start = time.perf_counter()
        try:
            out = produce()
        finally:
            if weights_digest(exp.model.state_dict()) != own_digest:
                exp.model.load_state_dict(own_state)
                raise RuntimeError(f"defense {name!r} changed the run's own model (it is handed a copy; the run's "
                                   "model must stay as trained); its weights were put back")
        wall = time.perf_counter() - start
        if not isinstance(out, Repair) or not isinstance(out.model, nn.Module):
            raise TypeError(f"defense {name!r} returned {type(out).__name__}, not a Repair holding a model")
        problem = load_strictly(model, {k: v.detach().cpu() for k, v in out.model.state_dict().items()})
        if problem is not None:
            raise ValueError(f"defense {name!r} returned a model that does not fit the run's architecture: {problem}")
        meta = {"wall_s": wall, "model_epochs": float(out.model_epochs), "records": list(out.records)}
        if out.isolated is not None:
            meta["isolated"] = torch.as_tensor(out.isolated, dtype=torch.bool).cpu()
        path = cache.put(identity, model.state_dict(), meta)
        if path is not None:
            log.info("%s: stored the repaired model in %s", name, path)
        for stale in cache.root.parent.joinpath("checkpoints").glob(f"{key}.*.pt") if cache.enabled else ():
            stale.unlink(missing_ok=True)
        return model.eval(), meta, False


def score_repair(exp, name: str, model: nn.Module, meta: dict, from_cache: bool,
                 test_rows: torch.Tensor | None = None) -> list[dict]:
    """C-Acc (`ba`), ASR, TMR, RA of the repaired `model` and DER against the run's own model, on the
    clean test images `test_rows` (None: all) and their triggered copies, plus the defense's cost."""
    bs, bd = int(exp.cfg.eval_batch_size), exp.backdoor_test
    if test_rows is None:
        x, y = exp.data.x_test, exp.data.y_test
        before = backdoor_metrics(exp.pred_test, y, exp.pred_backdoor, bd)
    else:
        x, y, bd = exp.data.x_test[test_rows], exp.data.y_test[test_rows], subset_backdoor(bd, test_rows)
        before = score_model(exp.model, x, y, bd, exp.device, bs)
    after = score_model(model, x, y, bd, exp.device, bs)
    got = {r["metric"]: r["value"] for r in after}
    was = {r["metric"]: r["value"] for r in before}
    rows = list(after)
    if "asr" in got:
        rows.append(record("der", metrics.defense_effectiveness_rating(was["ba"], was["asr"], got["ba"], got["asr"])))
        rows.append(record("asr_undefended", was["asr"]))
    rows += [record("ba_undefended", was["ba"]), record("wall_s", float(meta["wall_s"])),
             record("model_epochs", float(meta["model_epochs"])), record("repair_cache", 1.0 if from_cache else 0.0),
             *meta.get("records", [])]
    log.info("%s: C-Acc %.3f -> %.3f, ASR %s -> %s, RA %s, DER %s (%.1fs, %g model-epochs%s)", name, was["ba"], got["ba"],
             _fmt(was.get("asr")), _fmt(got.get("asr")), _fmt(got.get("ra")),
             _fmt(next((r["value"] for r in rows if r["metric"] == "der"), None)), float(meta["wall_s"]),
             float(meta["model_epochs"]), ", from the cache" if from_cache else "")
    return rows


def _fmt(value) -> str:
    return "-" if value is None else f"{value:.3f}"
