"""One run, top to bottom: data -> poison -> train (cached) -> evaluate -> defenses -> analyses
-> results. Every step is a function of the composed config; nothing here is method-specific."""
from __future__ import annotations

import logging
import platform
import random
import time
from pathlib import Path

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf

import bdexp
from bdexp.attacks import build_attack
from bdexp.attacks.base import Attack, BackdoorTestSet, PoisonedTrainSet
from bdexp.experiment import Experiment
from bdexp.cache import ModelCache, model_key
from bdexp.data import load_dataset
from bdexp.data.base import ImageDataset
from bdexp.data.loader import DeviceLoader, to_float, to_uint8
from bdexp.errors import ConfigError
from bdexp.evaluate import backdoor_metrics
from bdexp.models import build_model
from bdexp.report.summary import print_summary
from bdexp.results import write_results
from bdexp.training import REGIMES, train_model

log = logging.getLogger(__name__)


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError("device=cuda but no CUDA device is visible; use device=auto or device=cpu")
    if name not in ("cpu", "cuda") and not name.startswith("cuda:"):
        raise ConfigError(f"device={name!r} is not one of auto, cpu, cuda, cuda:N")
    return torch.device(name)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def prepare(cfg: DictConfig) -> tuple[ImageDataset, Attack, PoisonedTrainSet, BackdoorTestSet]:
    """Load the dataset and poison it; pure function of the config and seed."""
    seed = int(cfg.seed)
    cache_dir = cfg.cache.dir if cfg.cache.enabled else None
    data = load_dataset(cfg.dataset, seed=seed, cache_dir=cache_dir)
    attack = build_attack(cfg.attack, num_classes=data.num_classes, image_shape=data.image_shape, seed=seed)
    train = attack.poison_train(to_float(data.x_train), data.y_train)
    train.x = to_uint8(train.x)
    bd = attack.backdoor_test(to_float(data.x_test), data.y_test)
    bd.x = to_uint8(bd.x)
    return data, attack, train, bd


def fit(cfg: DictConfig, data: ImageDataset, attack: Attack, train: PoisonedTrainSet, device: torch.device,
        cache: ModelCache, *, train_cfg: DictConfig | None = None, keep: torch.Tensor | None = None,
        key_extra: dict | None = None, describe: str = "train") -> tuple[torch.nn.Module, dict]:
    """Build the model and train it on `train` (optionally only rows in `keep`), or load it from
    the cache when an identical model was trained before. Returns (model, info)."""
    train_cfg = train_cfg if train_cfg is not None else cfg.train
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
    loader = DeviceLoader(
        train.x[rows], train.y[rows], train.poison[rows], train.cross[rows],
        batch_size=train_cfg.batch_size, device=device, seed=seed,
        crop_padding=cfg.dataset.augment.crop_padding, flip=cfg.dataset.augment.flip,
        drop_last=True, batch_hook=attack.train_batch_hook,
    )
    regime = regime_cls(train_cfg, attack=attack)
    history = train_model(model, loader, regime, train_cfg, device, describe=describe)
    meta = {"history": history, "trained_on": len(loader.x)}
    path = cache.put(key, model.state_dict(), meta)
    if path is not None:
        log.info("%s: stored model in %s", describe, path)
    return model, {"cache": "miss" if cache.enabled else "disabled", "key": key, **meta}


def run(cfg: DictConfig, run_dir: str | Path) -> dict:
    """Execute one experiment and write `run_dir/results.json`; returns the results payload."""
    start = time.perf_counter()
    run_dir = Path(run_dir)
    seed_everything(int(cfg.seed))
    device = resolve_device(str(cfg.device))
    log.info("device %s, output %s", device, run_dir)

    data, attack, train, bd = prepare(cfg)
    log.info("%s: %d train (%d poisoned) / %d test images %s, %d classes; backdoor test set %d",
             data.name, len(train.y), int(train.poison.sum()), len(data.y_test), data.image_shape,
             data.num_classes, len(bd.y_target))
    cache = ModelCache(cfg.cache.dir, enabled=bool(cfg.cache.enabled))
    model, fit_info = fit(cfg, data, attack, train, device, cache)

    exp = Experiment(cfg, device, data, attack, train, bd, model, cache, info={"run_dir": run_dir})
    metrics = backdoor_metrics(exp.pred_test, data.y_test, exp.pred_backdoor, bd)
    metrics += run_extensions(exp)

    history = fit_info.get("history", {})
    run_info = {
        "dataset": cfg.dataset.name,
        "model": cfg.model.name,
        "attack": cfg.attack.name,
        "attack_mode": cfg.attack.get("mode"),
        "train": cfg.train.name,
        "lambda": cfg.train.get("mmd_weight"),
        "kernel": cfg.train.get("kernel"),
        "seed": int(cfg.seed),
        "scale": cfg.get("scale_name", "full"),
        "device": str(device),
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
        "bdexp_version": bdexp.__version__,
        "torch_version": torch.__version__,
        "model_cache": fit_info["cache"],
        "model_key": fit_info["key"],
        "train_wall_s": history.get("wall_s"),
        "train_images_per_s": (sum(history["images_per_s"]) / len(history["images_per_s"])
                               if history.get("images_per_s") else None),
        "n_train": len(train.y),
        "n_poison": int(train.poison.sum()),
        "wall_s": time.perf_counter() - start,
        "config": OmegaConf.to_container(cfg, resolve=True),
    }
    path = write_results(run_dir, run_info, metrics)
    if cfg.get("progress", True):
        print_summary(run_info, metrics)
    log.info("results written to %s", path)
    return {"run": run_info, "metrics": metrics}


def run_extensions(exp: Experiment) -> list[dict]:
    """Defenses and analyses selected in the config (empty groups by default)."""
    from bdexp.analysis import run_analyses
    from bdexp.defenses import run_defenses

    return run_defenses(exp) + run_analyses(exp)
