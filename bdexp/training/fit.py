"""Train a model for a run, or load it from the cache (DESIGN data flow steps 5-6).

Used by the pipeline for the run's model and by sanitizers that retrain on a kept subset.
"""
from __future__ import annotations

import logging

import torch
from omegaconf import DictConfig

from bdexp.attacks.base import Attack, PoisonedTrainSet
from bdexp.cache import ModelCache, model_key
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
    key = model_key(cfg, train_cfg=regime_cls.cache_identity(train_cfg), extra={**(key_extra or {}), "arch": arch})
    # One job trains a key at a time; a concurrent job waits here, then loads the stored model.
    with cache.lock(key):
        hit = cache.get(key)
        if hit is not None:
            try:
                model.load_state_dict(hit["state_dict"])
            except RuntimeError as err:
                log.warning("%s: cached model %s does not fit the model (%s); retraining", describe,
                            cache.path(key), str(err).splitlines()[0])
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
