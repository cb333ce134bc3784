"""Content-addressed store for trained models (DESIGN data flow step 6).

A model is stored under the hash of everything it depends on: the dataset, model, attack and
training configs, the seed and the bdexp version. A sweep over defenses therefore trains each
model once. Files are written to a temporary name and renamed, so a crash never leaves a
half-written checkpoint, and they are loaded with ``weights_only=True``. Training a key holds a
file lock (`lock`), so concurrent sweep jobs that need the same model train it once.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import time
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf

import bdexp

try:  # POSIX record locks (work on NFS home directories of SLURM clusters too)
    import fcntl
except ImportError:  # pragma: no cover - Windows: no cross-process lock, atomic writes still hold
    fcntl = None

log = logging.getLogger(__name__)
# Keys that say where data lives or how chatty a run is, not what is computed.
_IRRELEVANT_KEYS = {"root", "download", "debian_dir", "log_every"}


def _strip(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {k: _strip(v) for k, v in sorted(obj.items()) if k not in _IRRELEVANT_KEYS}
    if isinstance(obj, list):
        return [_strip(v) for v in obj]
    return obj


def model_key(cfg: DictConfig, *, train_cfg: DictConfig | dict | None = None, extra: dict | None = None) -> str:
    """Hash of what a trained model depends on; `train_cfg`/`extra` let a defense that retrains
    (on a sanitized set, say) key its own models."""
    parts = {
        "dataset": OmegaConf.to_container(cfg.dataset, resolve=True),
        "model": OmegaConf.to_container(cfg.model, resolve=True),
        "attack": OmegaConf.to_container(cfg.attack, resolve=True),
        "train": _plain(train_cfg if train_cfg is not None else cfg.train),
        "seed": int(cfg.seed),
        "version": bdexp.__version__,
        "extra": extra or {},
    }
    blob = json.dumps(_strip(parts), sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:20]


def _plain(cfg: DictConfig | dict) -> dict:
    return cfg if isinstance(cfg, dict) else OmegaConf.to_container(cfg, resolve=True)


def atomic_torch_save(obj: Any, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


class ModelCache:
    """`get`/`put` trained state dicts by key under `root/models/`."""

    def __init__(self, root: str | os.PathLike, enabled: bool = True):
        self.root = Path(os.path.expanduser(str(root))) / "models"
        self.enabled = enabled

    def path(self, key: str) -> Path:
        return self.root / f"{key}.pt"

    def checkpoint_path(self, key: str) -> Path | None:
        """Where an unfinished training of `key` keeps its resumable epoch checkpoint."""
        return self.root.parent / "checkpoints" / f"{key}.pt" if self.enabled else None

    @contextlib.contextmanager
    def lock(self, key: str):
        """Hold an exclusive lock on `key` while training or loading it, so concurrent jobs that
        need the same model train it once: the second waits, then loads the stored file. The OS
        drops the lock of a killed job, and the next holder resumes from its checkpoint."""
        if not self.enabled or fcntl is None:
            yield
            return
        path = self.root.parent / "locks" / f"{key}.lock"
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "a+") as handle:
            try:
                fcntl.lockf(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                log.info("model %s is being trained by another job; waiting for it", key)
                t0 = time.perf_counter()
                fcntl.lockf(handle, fcntl.LOCK_EX)
                log.info("model %s: lock released after %.0fs", key, time.perf_counter() - t0)
            try:
                yield
            finally:
                fcntl.lockf(handle, fcntl.LOCK_UN)

    def get(self, key: str) -> dict | None:
        """The stored {"state_dict", "meta"} or None; a corrupt file is treated as a miss."""
        if not self.enabled or not self.path(key).exists():
            return None
        try:
            return torch.load(self.path(key), map_location="cpu", weights_only=True)
        except Exception:  # truncated or foreign file: retrain and overwrite
            return None

    def put(self, key: str, state_dict: dict, meta: dict) -> Path | None:
        if not self.enabled:
            return None
        state = {k: v.detach().cpu() for k, v in state_dict.items()}
        atomic_torch_save({"state_dict": state, "meta": meta}, self.path(key))
        return self.path(key)
