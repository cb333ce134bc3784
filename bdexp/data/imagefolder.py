"""`imagefolder`: any `root/train/<class>/*` + `root/test/<class>/*` tree of image files.

Listing follows torchvision's ImageFolder (class = sorted sub-directory names, files with the
usual image extensions: jpg, jpeg, png, ppm, bmp, pgm, tif, tiff, webp). Each image is
converted to `channels` and resized to `image_size` while decoding (common.FitSquare), so the
files may have any size and mode.

A file that is not a decodable image stops the run with its path, or, with
`dataset.skip_bad_files=true`, is left out and counted (ImageDataset.skipped, the log line of
`load_dataset` and `n_skipped_files` in results.json). The decoded tensors are cached under a
key that includes the listing of root/train and root/test (common.files_fingerprint).
"""
from __future__ import annotations

import os
from dataclasses import dataclass

from bdexp.data.base import DATASETS, DataOptions, Fit, ImageDataset
from bdexp.data.common import FitSquare, cache_on_disk, data_root, decode_all
from bdexp.errors import DatasetUnavailable


@dataclass(frozen=True)
class ImageFolderOptions(DataOptions):
    fit: Fit = "stretch"
    skip_bad_files: bool = False  # true: leave out files that are not decodable images (counted)


def _split_dirs(opts: ImageFolderOptions) -> list[str]:
    root = data_root(opts)
    return [os.path.join(root, "train"), os.path.join(root, "test")]


@DATASETS.register("imagefolder", options=ImageFolderOptions)
@cache_on_disk(files=_split_dirs)
def imagefolder(opts: ImageFolderOptions) -> ImageDataset:
    from torchvision.datasets import ImageFolder

    root = data_root(opts)
    layout = (
        f"expected {root}/train/<class>/<image> and {root}/test/<class>/<image>; "
        "set dataset.root to such a directory"
    )
    dirs = {split: os.path.join(root, split) for split in ("train", "test")}
    missing = [d for d in dirs.values() if not os.path.isdir(d)]
    if missing:
        raise DatasetUnavailable(f"dataset 'imagefolder': {' and '.join(missing)} not found; {layout}.")

    fit = FitSquare(opts.image_size, opts.channels, opts.fit)
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
    skip = opts.skip_bad_files
    skipped: list[str] = []
    splits = []
    for split, ds in folders.items():
        def name_of(i: int, ds=ds) -> str:
            return ds.samples[i][0]

        x, y = decode_all(len(ds), ds.__getitem__, f"dataset 'imagefolder' {split}", name_of=name_of,
                          skipped=skipped if skip else None)
        empty = [c for k, c in enumerate(train_classes) if not bool((y == k).any())]
        if empty:
            raise DatasetUnavailable(
                f"dataset 'imagefolder' at {root}: no readable image left in {split}/{empty[0]}"
                f"{f' (and {len(empty) - 1} more classes)' if len(empty) > 1 else ''} after skipping "
                f"{len(skipped)} unreadable file(s).")
        splits += [x, y]
    return ImageDataset("imagefolder", *splits, list(train_classes),
                        skipped=[os.path.relpath(f, root) for f in skipped])
