"""Train a model for a run, or load it from the cache (README, "What a run does", steps 3-4).

Used by the pipeline for the run's model and by sanitizers that retrain on a kept subset. The
cache key holds a fingerprint of the exact tensors trained on (bdexp/cache.py). A stored model
is used only if it loads strictly: same parameter names, shapes and dtypes, finite values.
Otherwise it is set aside and the model trains from its fresh, seeded initialization, never
from a half-loaded one (PyTorch copies the matching tensors before it raises on a mismatch).
"""
from __future__ import annotations

import copy
import logging
from dataclasses import dataclass

import torch
from omegaconf import DictConfig

from bdexp.attacks.base import Attack, PoisonedTrainSet
from bdexp.cache import ModelCache, data_fingerprint, key_of, model_identity
from bdexp.data.base import ImageDataset
from bdexp.data.loader import DeviceLoader
from bdexp.models import build_for
from bdexp.training.base import REGIMES
from bdexp.training.defender import DefenderLoader, check_defender_regime
from bdexp.training.loop import train_model

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class FitRequest:
    """Which model to train for a run, beyond the run's own (the default: the run's regime on
    every row of its training set)."""

    train_cfg: DictConfig | None = None  # another regime/schedule (training/defender.py); None: cfg.train
    keep: torch.Tensor | None = None  # train only on these rows (a sanitizer's kept set)
    key_extra: dict | None = None  # what else tells this model apart in the cache (a role, a mask hash)
    describe: str = "train"  # the progress bar's and log's name
    defender: bool = False  # the defender trains: no poison flags, no attack hook, no flag-reading regime


def fit(cfg: DictConfig, data: ImageDataset, attack: Attack, train: PoisonedTrainSet, device: torch.device,
        cache: ModelCache, request: FitRequest = FitRequest()) -> tuple[torch.nn.Module, dict]:
    """Build the model and train it on `train` (optionally only rows in `request.keep`), or load
    it from the cache when an identical model was trained before. Returns (model, info)."""
    train_cfg = request.train_cfg if request.train_cfg is not None else cfg.train
    keep, key_extra, describe, defender = request.keep, request.key_extra, request.describe, request.defender
    if defender:
        check_defender_regime(train_cfg.name, "the defender's train.name")
        if bool(train.cross.any()):  # the attack's batch hook is off: not the attacker's model
            key_extra = {**(key_extra or {}), "attack_batch_hook": "off"}
    # A co-trained attack (bdexp/attacks/cotrained.py) trains with the attacker's model only.
    co_attack = attack if attack.co_trained and not defender else None
    if co_attack is not None:
        key_extra = {**(key_extra or {}), "attack_co_training": "on"}
    seed = int(cfg.seed)
    torch.manual_seed(seed)  # identical init for cached and fresh models
    model = build_for(cfg.model, train.x if keep is None else train.x[keep], data.num_classes).to(device)
    regime_cls = REGIMES.get(train_cfg.name)
    # The architecture's parameter names and shapes enter the key, so editing a model's code
    # never loads stale weights into it.
    arch = [(name, list(t.shape)) for name, t in model.state_dict().items()]
    fingerprint = data_fingerprint(train.x, train.y, train.poison, train.cross, keep)
    identity = model_identity(cfg, train_cfg=regime_cls.cache_identity(train_cfg),
                              extra={**(key_extra or {}), "arch": arch}, data=fingerprint)
    key = key_of(identity)
    # One job trains a key at a time; a concurrent job waits here, then loads the stored model.
    with cache.lock(key):
        hit = cache.get(key)
        if hit is not None:
            problem = None
            if co_attack is not None:  # checked before the model loads: a refused hit leaves both as they were
                problem = ("it holds no attack state" if "attack_state" not in hit
                           else co_attack.final_state_problem(hit["attack_state"]))
            problem = problem or load_strictly(model, hit["state_dict"])
            if problem is None and co_attack is not None:
                co_attack.load_final_state(hit["attack_state"])
            if problem is not None:
                cache.set_aside(key, f"{describe}: does not fit the model: {problem}")
                hit = None
        if hit is not None:
            model.eval()
            log.info("%s: loaded cached model %s (no training)", describe, cache.path(key))
            return model, {"cache": "hit", "key": key, **hit["meta"]}
        rows = slice(None) if keep is None else keep
        common = dict(batch_size=train_cfg.batch_size, device=device, seed=seed, drop_last=True,
                      crop_padding=cfg.dataset.augment.crop_padding, flip=cfg.dataset.augment.flip)
        if defender:
            loader = DefenderLoader(train.x[rows], train.y[rows], **common)
        else:
            loader = DeviceLoader(train.x[rows], train.y[rows], train.poison[rows], train.cross[rows],
                                  batch_hook=attack.train_batch_hook, **common)
        regime = regime_cls(train_cfg, attack=None if defender else attack)
        checkpoint = cache.checkpoint_path(key)
        if co_attack is not None:
            co_attack.start_training(device, int(train_cfg.epochs))
        history = train_model(model, loader, regime, train_cfg, device, describe=describe, checkpoint=checkpoint,
                              checkpoint_every=int(cfg.checkpoint_every), attack=co_attack)
        meta = {"history": history, "trained_on": len(loader.x)}
        path = cache.put(identity, model.state_dict(), meta,
                         attack_state=co_attack.final_state() if co_attack is not None else None)
        if path is not None:
            log.info("%s: stored model in %s", describe, path)
        if checkpoint is not None:
            checkpoint.unlink(missing_ok=True)
        return model, {"cache": "miss" if cache.enabled else "disabled", "key": key, **meta}


def load_strictly(model: torch.nn.Module, state_dict: dict) -> str | None:
    """Load `state_dict` into `model` only if it fits exactly; returns None when loaded, else why
    not, with `model` left exactly as it was (its seeded initialization)."""
    own = model.state_dict()
    missing = [k for k in own if k not in state_dict]
    unexpected = [k for k in state_dict if k not in own]
    if missing or unexpected:
        return f"missing {missing[:3]}{'...' if len(missing) > 3 else ''}, unexpected " \
               f"{unexpected[:3]}{'...' if len(unexpected) > 3 else ''}"
    for name, mine in own.items():
        theirs = state_dict[name]
        if not isinstance(theirs, torch.Tensor) or theirs.shape != mine.shape or theirs.dtype != mine.dtype:
            got = f"{theirs.dtype} {tuple(theirs.shape)}" if isinstance(theirs, torch.Tensor) else type(theirs).__name__
            return f"{name} is {got}, the model has {mine.dtype} {tuple(mine.shape)}"
        if theirs.is_floating_point() and not bool(torch.isfinite(theirs).all()):
            return f"{name} holds non-finite values"
    before = copy.deepcopy(own)
    try:
        model.load_state_dict(state_dict, strict=True)
    except Exception as err:  # noqa: BLE001 - put the initialization back, whatever went wrong
        model.load_state_dict(before)
        return f"{type(err).__name__}: {str(err).strip().splitlines()[0] if str(err).strip() else ''}"
    return None
