"""Content-addressed store for trained models (README, "What a run does", step 4).

A model is stored under the hash of everything it depends on: a fingerprint of the exact
training tensors it saw (`data_fingerprint`: images, labels, poison flags; so two image folders
at different paths, or one folder edited between runs, never share a model), the dataset's
remaining keys (augmentation), the model, attack and training configs, the seed and the bdexp
version. Where the data lives (`root`) is not part of the key; what it holds is. A sweep over
defenses therefore trains each model once. Files are written to a temporary name and renamed,
so a crash never leaves a half-written checkpoint, and they are loaded with
``weights_only=True`` (a pickle that would run code is refused).

A stored model carries what it was trained for: its key, the identity the key hashes (the
dataset, model, attack and training configs, the data fingerprint, seed and version: what
`model_identity` returns) and a sha256 digest of its weights. `get` serves it only when all three
agree with the key asked for: a file copied over another key (a one-epoch model under a
twenty-epoch model's name) or weights changed after storing (a sign-flipped layer) is, like a file
that cannot be read, set aside as `<key>.pt.bad` with a warning and counts as a miss. Training a key holds a file lock (`lock`), so concurrent sweep jobs that
need the same model train it once.
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
from bdexp.atomic import atomic_write

try:  # POSIX record locks (work on NFS home directories of SLURM clusters too)
    import fcntl
except ImportError:  # pragma: no cover - Windows: no cross-process lock, atomic writes still hold
    fcntl = None

log = logging.getLogger(__name__)
# Keys that say where data lives or how chatty a run is, not what is computed.
_IRRELEVANT_KEYS = {"root", "download", "debian_dir", "log_every"}
# Dataset keys that only choose which images are decoded or kept: with a fingerprint of the
# training tensors in the key they add nothing (train_limit above the dataset's size then gives
# the unlimited run's key, as it gives its data), and test_limit never reaches the model.
_DATA_ONLY_KEYS = {"train_limit", "test_limit", "skip_bad_files"}


def _strip(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {k: _strip(v) for k, v in sorted(obj.items()) if k not in _IRRELEVANT_KEYS}
    if isinstance(obj, list):
        return [_strip(v) for v in obj]
    return obj


def _hash_tensor(h, t: torch.Tensor | None) -> None:
    """Feed the dtype, shape and bytes of `t` (or a marker for None) into the hash `h`."""
    if t is None:
        h.update(b"none;")
        return
    t = t.detach().cpu().contiguous()
    h.update(f"{t.dtype}{tuple(t.shape)};".encode())
    if t.numel():
        arr = (t.view(torch.int16) if t.dtype == torch.bfloat16 else t).numpy().reshape(-1)
        h.update(memoryview(arr).cast("B"))


def data_fingerprint(*tensors: torch.Tensor | None) -> str:
    """sha256 over the dtype, shape and bytes of each tensor (None for an absent one): the
    identity of a training set. About 0.1 s for CIFAR-10's 50 000 uint8 images on one core."""
    h = hashlib.sha256()
    for t in tensors:
        _hash_tensor(h, t)
    return h.hexdigest()


def weights_digest(state_dict: dict) -> str:
    """sha256 over the names, dtypes, shapes and bytes of a state dict's tensors (sorted by name):
    what a stored model's weights must still hash to when it is served."""
    h = hashlib.sha256()
    for name in sorted(state_dict):
        h.update(f"{name};".encode())
        _hash_tensor(h, state_dict[name])
    return h.hexdigest()


def model_identity(cfg: DictConfig, *, train_cfg: DictConfig | dict | None = None, extra: dict | None = None,
                   data: str | None = None) -> dict:
    """What a trained model depends on, as plain JSON-able data (its key is `key_of` this);
    `train_cfg`/`extra` let a defense that retrains (on a sanitized set, say) key its own models.
    `data`: the `data_fingerprint` of the tensors trained on; given, it replaces the dataset keys
    that only select data (`_DATA_ONLY_KEYS`)."""
    dataset = OmegaConf.to_container(cfg.dataset, resolve=True)
    if data is not None:
        dataset = {k: v for k, v in dataset.items() if k not in _DATA_ONLY_KEYS}
    parts = {
        "dataset": dataset,
        "data": data,
        "model": OmegaConf.to_container(cfg.model, resolve=True),
        "attack": OmegaConf.to_container(cfg.attack, resolve=True),
        "train": _plain(train_cfg if train_cfg is not None else cfg.train),
        "seed": int(cfg.seed),
        "version": bdexp.__version__,
        "extra": extra or {},
    }
    return json.loads(json.dumps(_strip(parts), sort_keys=True, default=str))


def key_of(identity: dict) -> str:
    """The cache key of a `model_identity`."""
    blob = json.dumps(identity, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:20]


def model_key(cfg: DictConfig, **parts) -> str:
    """The cache key of what a trained model depends on (`model_identity`'s keywords)."""
    return key_of(model_identity(cfg, **parts))


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0][:200] if text else ""


def _record_problem(hit: Any) -> str | None:
    """Why `hit` is not a {"state_dict": {name: tensor}, "meta": dict} record, with an optional
    "attack_state": {name: tensor} (None if it is)."""
    if not isinstance(hit, dict) or not isinstance(hit.get("state_dict"), dict) or not isinstance(hit.get("meta"), dict):
        keys = sorted(map(str, hit))[:5] if isinstance(hit, dict) else type(hit).__name__
        return f"not a stored model (found {keys})"
    for part in ("state_dict", "attack_state"):
        tensors = hit.get(part, {})
        if not isinstance(tensors, dict) or not all(
                isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in tensors.items()):
            return f"its {part} holds something other than named tensors"
    return None


def stored_digest(state_dict: dict, attack_state: dict | None = None) -> str:
    """The digest a record's tensors must hash to: the weights, and a co-trained attack's tensors
    under an `attack/` prefix (none: the weights' digest alone, as before attacks had state)."""
    return weights_digest({**state_dict, **{f"attack/{k}": v for k, v in (attack_state or {}).items()}})


def _provenance_problem(hit: dict, key: str) -> str | None:
    """Why the record `hit` is not the model of `key` (None if it is): it must carry that key, an
    identity that hashes to it, and weights that still hash to their stored digest."""
    stored_key, identity, digest = hit.get("key"), hit.get("identity"), hit.get("weights_sha256")
    if not isinstance(stored_key, str) or not isinstance(identity, str) or not isinstance(digest, str):
        return "it carries no key, identity or weights digest (stored by an older bdexp, or not by bdexp)"
    if stored_key != key:
        return f"it was stored for model {stored_key}, not {key} (a file copied over another model's)"
    try:
        hashed = key_of(json.loads(identity))
    except ValueError:
        return "its identity is not readable JSON"
    if hashed != key:
        return f"its identity hashes to {hashed}, not to its key {key} (edited after storing)"
    if stored_digest(hit["state_dict"], hit.get("attack_state")) != digest:
        return "its weights do not match their stored digest (changed after storing)"
    return None


def _plain(cfg: DictConfig | dict) -> dict:
    return cfg if isinstance(cfg, dict) else OmegaConf.to_container(cfg, resolve=True)


def atomic_torch_save(obj: Any, path: Path) -> None:
    """torch.save through bdexp.atomic.atomic_write (no torn checkpoint, no temporary left)."""
    atomic_write(path, lambda tmp: torch.save(obj, tmp))


class ModelCache:
    """`get`/`put` trained state dicts by key under `root/<kind>/`: `models` (trained
    classifiers, with a co-trained attack's state beside them) or `triggers` (optimized triggers,
    bdexp/attacks/optimized.py); both verified the same way before they are served."""

    def __init__(self, root: str | os.PathLike, enabled: bool = True, kind: str = "models"):
        self.root = Path(os.path.expanduser(str(root))) / kind
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
        """The stored {"state_dict", "meta", ...} of `key`, or None. A file that does not load
        (truncated, random bytes, a pickle that is more than tensors), is not such a record, or is
        not the model of `key` (`_provenance_problem`) is set aside (`set_aside`) and treated as a
        miss."""
        if not self.enabled or not self.path(key).exists():
            return None
        try:
            hit = torch.load(self.path(key), map_location="cpu", weights_only=True)
        except Exception as err:  # noqa: BLE001 - any unreadable file means: retrain
            self.set_aside(key, f"unreadable: {type(err).__name__}: {_first_line(err)}")
            return None
        problem = _record_problem(hit) or _provenance_problem(hit, key)
        if problem is not None:
            self.set_aside(key, problem)
            return None
        return hit

    def set_aside(self, key: str, reason: str) -> Path | None:
        """Move the stored file of `key` to `<key>.pt.bad` (replacing an older one) with a
        warning, so that it is kept for inspection but never loaded again."""
        path = self.path(key)
        bad = path.with_name(path.name + ".bad")
        try:
            os.replace(path, bad)
        except OSError as err:
            log.warning("cached model %s is not usable (%s) and could not be moved aside (%s); "
                        "training a fresh model", path, reason, err)
            return None
        log.warning("cached model %s is not usable (%s); moved it to %s and training a fresh model",
                    path, reason, bad)
        return bad

    def put(self, identity: dict, state_dict: dict, meta: dict, attack_state: dict | None = None) -> Path | None:
        """Store a model under `key_of(identity)` with its key, identity and weights digest;
        `attack_state`: a co-trained attack's tensors, stored and digested with the weights."""
        if not self.enabled:
            return None
        key = key_of(identity)
        state = {k: v.detach().cpu().clone() for k, v in state_dict.items()}
        record = {"state_dict": state, "meta": meta, "key": key,
                  "identity": json.dumps(identity, sort_keys=True, default=str)}
        if attack_state is not None:
            record["attack_state"] = {k: v.detach().cpu().clone() for k, v in attack_state.items()}
        record["weights_sha256"] = stored_digest(state, record.get("attack_state"))
        atomic_torch_save(record, self.path(key))
        return self.path(key)
