"""Datasets (README, "What a run does", step 1): sources registered by name, and `load_dataset`, which
sizes, caches and subsets them into the uint8 NCHW `ImageDataset` every later stage uses.

    ds = load_dataset(cfg.dataset, seed=cfg.seed, cache_dir=cfg.cache.dir)
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
from typing import Any, Callable

import torch

from bdexp.data.base import DATASETS, DataOptions, ImageDataset, resize_uint8, stratified_subset
from bdexp.data.common import DigestIndex, data_root
from bdexp.errors import ConfigError
from bdexp.registry import import_submodules

__all__ = ["DATASETS", "DataOptions", "ImageDataset", "load_dataset", "convert_channels", "cache_path",
           "dataset_options"]

log = logging.getLogger(__name__)

# Keys that choose a subset or a train-time transform, not the tensors: left out of the cache key.
NOT_IDENTIFYING = frozenset({"train_limit", "test_limit", "augment", "download"})
# Bump when the stored layout or the decoding changes (2: the files listing, `skipped`; 3: keyed by
# the files' contents, 16-bit, float and CIELAB decoding, the key stored in the file, `not_regular`).
CACHE_FORMAT = 3


def dataset_options(cfg: Any) -> tuple[str, Callable[[DataOptions], ImageDataset], DataOptions]:
    """(name, source, parsed options) of the dataset config node `cfg` (a DictConfig or a mapping);
    a ConfigError names an unknown dataset or every bad key."""
    name = cfg.get("name") if cfg is not None else None
    source = DATASETS.get(str(name))
    return str(name), source, DATASETS.options(str(name)).parse(cfg, "dataset")


def load_dataset(cfg: Any, seed: int, cache_dir: str | None = None) -> ImageDataset:
    """The dataset `cfg.name` at `cfg.image_size` / `cfg.channels`, limited by
    `cfg.train_limit` / `cfg.test_limit` (class-stratified, drawn with `seed`).

    Slow sources (those marked `cache_on_disk`) keep the sized full tensors under
    `cache_dir/datasets/`, keyed by the config and the contents of the source's files (a sha256
    of each file's bytes; `cache_path`), so edited data is decoded again; limits are applied
    after the cache, so they can vary freely. A dataset with fewer than two classes is refused:
    a backdoor sends inputs of one class to another.
    """
    name, source, opts = dataset_options(cfg)
    path = None
    full = None
    if cache_dir is not None and getattr(source, "cache_on_disk", False):
        path = _cache_path(name, opts, cache_dir)
        full = _read_cache(path)
    if full is None:
        full = _fit(source(opts), opts.image_size, opts.channels)
        if path is not None:
            # Keyed by what was decoded: the digests of the bytes the source read (files_key), else
            # the files listed again (a source that downloads has created its files only now).
            _write_cache(full, _cache_path(name, opts, cache_dir, files_key=full.files_key))
    _check_classes(full, opts)
    _warn_left_out(full)

    ds = _limit(full, opts, seed)
    log.debug(  # pipeline.run logs the same sizes with the poison counts at INFO
        "dataset %s: %d train / %d test, %s, %d classes",
        ds.name, len(ds.y_train), len(ds.y_test), "x".join(map(str, ds.image_shape)), ds.num_classes,
    )
    return ds


def _warn_left_out(ds: ImageDataset) -> None:
    """One warning line per kind of entry left out, on every run (read from the cache or not)."""

    def shown(names: list[str]) -> str:
        return ", ".join(names[:3]) + (", ..." if len(names) > 3 else "")

    not_regular = set(ds.not_regular)
    unreadable = [f for f in ds.skipped if f not in not_regular]
    if unreadable:
        log.warning("dataset %s: skipped %d unreadable %s (dataset.skip_bad_files=true): %s", ds.name,
                    len(unreadable), "file" if len(unreadable) == 1 else "files", shown(unreadable))
    if ds.not_regular:
        n = len(ds.not_regular)
        log.warning("dataset %s: skipped %d %s (symbolic links are not followed; FIFOs, sockets and devices "
                    "are not read): %s", ds.name, n,
                    "entry that is not a regular file" if n == 1 else "entries that are not regular files",
                    shown(ds.not_regular))


def _check_classes(ds: ImageDataset, opts: DataOptions) -> None:
    present = sorted(set(torch.unique(ds.y_train).tolist()))
    if ds.num_classes < 2 or len(present) < 2:
        where = f" at {data_root(opts)}" if ds.name == "imagefolder" else ""
        names = [ds.classes[k] for k in present if 0 <= k < len(ds.classes)]
        raise ConfigError(
            f"dataset {ds.name!r}{where} has {len(present)} class{'es' if len(present) != 1 else ''} with training "
            f"images ({', '.join(map(repr, names)) or 'none'}); backdoor experiments need >= 2 classes "
            "(the attack sends inputs of one class to another)"
        )


def convert_channels(x: torch.Tensor, channels: int) -> torch.Tensor:
    """uint8 NCHW 1 -> 3 channels by repetition, 3 -> 1 by luminance."""
    c = x.shape[1]
    if c == channels:
        return x
    if c == 1 and channels == 3:
        return x.expand(-1, 3, -1, -1).contiguous()
    if c == 3 and channels == 1:
        # ITU-R BT.601 luma weights, the same as PIL's convert("L").
        w = torch.tensor([0.299, 0.587, 0.114]).view(1, 3, 1, 1)
        out = [(chunk.float() * w).sum(1, keepdim=True) for chunk in x.split(4096)]
        return torch.cat([o.round_().clamp_(0, 255).to(torch.uint8) for o in out])
    raise ConfigError(f"cannot convert {c}-channel images to dataset.channels={channels} (use 1 or 3)")


def cache_path(cfg: Any, cache_dir: str) -> str:
    """`cache_dir/datasets/<sha256>.pt`, hashed over every key that decides the tensors:
    name, root (absolute), image_size, channels and the source's own keys, and over the contents
    of the files the source reads (common.cache_on_disk: a sha256 of each file's bytes, looked up
    in the digest index `cache_dir/datasets/digests/` while a file's device, inode, size, mtime
    and ctime are unchanged)."""
    name, _, opts = dataset_options(cfg)
    return _cache_path(name, opts, cache_dir)


def _cache_path(name: str, opts: DataOptions, cache_dir: str, files_key: str | None = None) -> str:
    """`cache_path`; `files_key`: the files' fingerprint as the source computed it while decoding."""
    cache_dir = os.path.abspath(os.path.expanduser(str(cache_dir)))
    ident = {"name": name, **{k: v for k, v in opts.as_dict().items() if k not in NOT_IDENTIFYING}}
    ident["root"] = data_root(opts)
    ident["cache_format"] = CACHE_FORMAT
    fingerprint = getattr(DATASETS.get(name), "cache_fingerprint", None)
    if files_key is not None:
        ident["files"] = files_key
    elif fingerprint is not None:
        where = hashlib.sha256(ident["root"].encode()).hexdigest()[:16]
        index = DigestIndex(os.path.join(cache_dir, "datasets", "digests", f"{name}-{where}.json"))
        ident["files"] = fingerprint(opts, index)
        index.save()
    digest = hashlib.sha256(json.dumps(ident, sort_keys=True, default=str).encode()).hexdigest()
    return os.path.join(cache_dir, "datasets", f"{digest}.pt")


def _fit(ds: ImageDataset, size: int, channels: int) -> ImageDataset:
    """Resize both splits and convert channels, in the cheaper order (fewer channels first)."""

    def fit(x: torch.Tensor) -> torch.Tensor:
        if channels < x.shape[1]:
            return resize_uint8(convert_channels(x, channels), size)
        return convert_channels(resize_uint8(x, size), channels)

    return dataclasses.replace(ds, x_train=fit(ds.x_train), x_test=fit(ds.x_test))


def _limit(ds: ImageDataset, opts: DataOptions, seed: int) -> ImageDataset:
    out = {}
    for split in ("train", "test"):
        x, y = getattr(ds, f"x_{split}"), getattr(ds, f"y_{split}")
        limit = getattr(opts, f"{split}_limit")
        if limit is not None:
            present = int(torch.unique(y).numel())
            if limit < min(present, len(y)):
                raise ConfigError(
                    f"dataset.{split}_limit={limit} is smaller than the {present} classes present; "
                    "a stratified subset needs at least one image per class"
                )
        if limit is not None and limit > len(y):
            log.warning("dataset.%s_limit=%d is larger than the %d %s images of %s; using all %d "
                        "(the same data, and model, as dataset.%s_limit=null)",
                        split, limit, len(y), split, ds.name, len(y), split)
        if limit is not None and limit < len(y):
            idx = stratified_subset(y, limit, seed)
            x, y = x[idx], y[idx]
        out[split] = (x, y)
    (x_train, y_train), (x_test, y_test) = out["train"], out["test"]
    return dataclasses.replace(ds, x_train=x_train, y_train=y_train, x_test=x_test, y_test=y_test)


def _tensors_digest(ds: ImageDataset) -> str:
    """sha256 of the stored tensors (bdexp.cache.data_fingerprint): a cached dataset is served only
    while its images and labels are the ones written (0.1 s for CIFAR-10)."""
    from bdexp.cache import data_fingerprint

    return data_fingerprint(ds.x_train, ds.y_train, ds.x_test, ds.y_test)


def _read_cache(path: str) -> ImageDataset | None:
    """The dataset stored at `path`, if it is there, readable, stored under this key (the file name)
    and its tensors match their stored digest; otherwise None, with a warning, and the caller decodes
    and writes it again."""
    if not os.path.exists(path):
        return None
    key = os.path.splitext(os.path.basename(path))[0]
    try:
        d = torch.load(path, map_location="cpu", weights_only=True)
        ds = ImageDataset(d["name"], d["x_train"], d["y_train"], d["x_test"], d["y_test"], list(d["classes"]),
                          [str(f) for f in d.get("skipped", [])], [str(f) for f in d.get("not_regular", [])])
        stored, digest = d.get("key"), d.get("sha256")
    except Exception as e:  # noqa: BLE001 - a damaged cache file is rebuilt, never fatal
        log.warning("ignoring unreadable dataset cache %s (%s: %s)", path, type(e).__name__, e)
        return None
    if stored != key:
        log.warning("ignoring dataset cache %s: it holds another key (%s; copied or renamed?); decoding again",
                    path, stored)
        return None
    if digest != _tensors_digest(ds):
        log.warning("ignoring dataset cache %s: its images or labels do not match the digest stored with them "
                    "(changed after it was written); decoding again", path)
        return None
    log.info("dataset %s read from cache %s", ds.name, path)
    return ds


def _write_cache(ds: ImageDataset, path: str) -> None:
    """torch.save through bdexp.atomic.atomic_write (a temp file in the same directory, renamed),
    with the key (the file name) and the tensors' digest inside, which `_read_cache` checks."""
    from bdexp.atomic import atomic_write

    record = {"name": ds.name, "x_train": ds.x_train, "y_train": ds.y_train, "x_test": ds.x_test,
              "y_test": ds.y_test, "classes": list(ds.classes), "skipped": list(ds.skipped),
              "not_regular": list(ds.not_regular), "key": os.path.splitext(os.path.basename(path))[0],
              "sha256": _tensors_digest(ds)}
    atomic_write(path, lambda tmp: torch.save(record, tmp))


# Last, so that a module of this package may `from bdexp.data import load_dataset` at import time.
import_submodules(__name__, __path__)
