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

import torch
from omegaconf import DictConfig

from bdexp.attacks.base import Attack, PoisonedTrainSet
from bdexp.cache import ModelCache, data_fingerprint, model_key
from bdexp.data.base import ImageDataset
from bdexp.data.loader import DeviceLoader, to_float
from bdexp.models import build_model
from bdexp.training.base import REGIMES
from bdexp.training.defender import DefenderLoader, check_defender_regime
from bdexp.training.loop import train_model

log = logging.getLogger(__name__)


def fit(cfg: DictConfig, data: ImageDataset, attack: Attack, train: PoisonedTrainSet, device: torch.device,
        cache: ModelCache, *, train_cfg: DictConfig | None = None, keep: torch.Tensor | None = None,
        key_extra: dict | None = None, describe: str = "train", defender: bool = False
        ) -> tuple[torch.nn.Module, dict]:
    """Build the model and train it on `train` (optionally only rows in `keep`), or load it from
    the cache when an identical model was trained before. Returns (model, info).
    `defender`: the defender trains (training/defender.py): no poison flags, no attack hook, and
    a regime that reads the flags is refused."""
    train_cfg = train_cfg if train_cfg is not None else cfg.train
    if defender:
        check_defender_regime(train_cfg.name, "the defender's train.name")
        if bool(train.cross.any()):  # the attack's batch hook is off: not the attacker's model
            key_extra = {**(key_extra or {}), "attack_batch_hook": "off"}
    seed = int(cfg.seed)
    x_f = to_float(train.x if keep is None else train.x[keep])
    mean = x_f.mean(dim=(0, 2, 3)).tolist()
    std = x_f.std(dim=(0, 2, 3)).clamp_min(1e-3).tolist()
    torch.manual_seed(seed)  # identical init for cached and fresh models
    model = build_model(cfg.model, in_channels=data.image_shape[0], num_classes=data.num_classes,
                        image_size=data.image_shape[1], mean=mean, std=std).to(device)
    regime_cls = REGIMES.get(train_cfg.name)
    # The architecture's parameter names and shapes enter the key, so editing a model's code
    # never loads stale weights into it.
    arch = [(name, list(t.shape)) for name, t in model.state_dict().items()]
    fingerprint = data_fingerprint(train.x, train.y, train.poison, train.cross, keep)
    key = model_key(cfg, train_cfg=regime_cls.cache_identity(train_cfg), extra={**(key_extra or {}), "arch": arch},
                    data=fingerprint)
    # One job trains a key at a time; a concurrent job waits here, then loads the stored model.
    with cache.lock(key):
        hit = cache.get(key)
        if hit is not None:
            problem = load_strictly(model, hit["state_dict"])
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
        history = train_model(model, loader, regime, train_cfg, device, describe=describe, checkpoint=checkpoint,
                              checkpoint_every=int(cfg.get("checkpoint_every", 1)))
        meta = {"history": history, "trained_on": len(loader.x)}
        path = cache.put(key, model.state_dict(), meta)
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
