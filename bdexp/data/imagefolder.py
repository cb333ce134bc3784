"""`imagefolder`: any `root/train/<class>/*` + `root/test/<class>/*` tree of image files.

Listing follows torchvision's ImageFolder (class = sorted sub-directory names, files with the
usual image extensions: jpg, jpeg, png, ppm, bmp, pgm, tif, tiff, webp). Each image is
converted to `channels` and resized to `image_size` while decoding (common.FitSquare), so the
files may have any size and mode.
"""
from __future__ import annotations

import os
from typing import Any

from bdexp.data.base import DATASETS, ImageDataset
from bdexp.data.common import FitSquare, cache_on_disk, data_root, decode_all
from bdexp.errors import DatasetUnavailable


@DATASETS.register("imagefolder")
@cache_on_disk
def imagefolder(cfg: Any) -> ImageDataset:
    from torchvision.datasets import ImageFolder

    root = data_root(cfg)
    layout = (
        f"expected {root}/train/<class>/<image> and {root}/test/<class>/<image>; "
        "set dataset.root to such a directory"
    )
    dirs = {split: os.path.join(root, split) for split in ("train", "test")}
    missing = [d for d in dirs.values() if not os.path.isdir(d)]
    if missing:
        raise DatasetUnavailable(f"dataset 'imagefolder': {' and '.join(missing)} not found; {layout}.")

    fit = FitSquare(int(cfg.image_size), int(cfg.get("channels") or 3), str(cfg.get("fit", "stretch")))
    folders = {}
    for split, path in dirs.items():
        try:
            folders[split] = ImageFolder(path, transform=fit)
        except (FileNotFoundError, OSError) as e:  # no class folders, or a class with no images
            raise DatasetUnavailable(f"dataset 'imagefolder': {e} ({layout}).") from None

    train_classes, test_classes = folders["train"].classes, folders["test"].classes
    if train_classes != test_classes:
        only_train = sorted(set(train_classes) - set(test_classes))
        only_test = sorted(set(test_classes) - set(train_classes))
        raise DatasetUnavailable(
            f"dataset 'imagefolder' at {root}: train/ and test/ must have the same class folders; "
            f"only in train: {only_train or '-'}, only in test: {only_test or '-'}."
        )
    splits = []
    for split, ds in folders.items():
        splits += decode_all(len(ds), ds.__getitem__, f"imagefolder {split}")
    return ImageDataset("imagefolder", *splits, list(train_classes))
