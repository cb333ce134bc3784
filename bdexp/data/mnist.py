"""`mnist` and `fashion_mnist`: 28×28 grayscale, 60000 train / 10000 test, 10 classes.

Both ship as four IDX files. They are read directly (numpy + gzip) from the first directory
that has them — for Fashion-MNIST Debian's `dataset-fashion-mnist` package
(/usr/share/datasets/fashion-mnist) first — else fetched with torchvision into `root`.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch

from bdexp.data.base import DATASETS, Augment, Channels, DigitAugment, DownloadOptions, ImageDataset
from bdexp.data.common import data_root, find_idx, idx_path, open_or_unavailable, read_idx
from bdexp.errors import DatasetUnavailable
from bdexp.options import option

# Label names from the Fashion-MNIST README (github.com/zalandoresearch/fashion-mnist), in label order.
FASHION_CLASSES = [
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
    "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
]
DEBIAN_FASHION_DIR = "/usr/share/datasets/fashion-mnist"  # where `apt-get install dataset-fashion-mnist` puts it


@dataclass(frozen=True)
class MnistOptions(DownloadOptions):
    image_size: int = option(28, lo=8)
    channels: Channels = 1
    augment: DigitAugment = DigitAugment()


@dataclass(frozen=True)
class FashionAugment(Augment):
    """Shifts of up to 2 px; garments are roughly left-right symmetric, so flips too."""

    crop_padding: int = option(2, lo=0)


@dataclass(frozen=True)
class FashionMnistOptions(MnistOptions):
    debian_dir: str = DEBIAN_FASHION_DIR  # read first when it holds the four IDX files
    augment: FashionAugment = FashionAugment()


@DATASETS.register("mnist", options=MnistOptions)
def mnist(opts: MnistOptions) -> ImageDataset:
    root = data_root(opts)
    # torchvision keeps the files in root/MNIST/raw; a bare copy directly in root works too.
    dirs = [root, os.path.join(root, "MNIST", "raw")]
    how = (
        "Set dataset.root to a directory containing MNIST/raw/ (or the four *-ubyte[.gz] files "
        "themselves), or run with network access and dataset.download=true."
    )
    return _idx_or_torchvision(opts, "mnist", dirs, [str(i) for i in range(10)], "MNIST", how)


@DATASETS.register("fashion_mnist", options=FashionMnistOptions)
def fashion_mnist(opts: FashionMnistOptions) -> ImageDataset:
    root = data_root(opts)
    debian = os.path.expanduser(opts.debian_dir)
    dirs = [debian, os.path.join(root, "FashionMNIST", "raw")]
    how = (
        "Install Debian's package (`apt-get install dataset-fashion-mnist`, files land in "
        f"{DEBIAN_FASHION_DIR}), set dataset.root to a directory containing FashionMNIST/raw/, "
        "or run with network access and dataset.download=true."
    )
    return _idx_or_torchvision(opts, "fashion_mnist", dirs, FASHION_CLASSES, "FashionMNIST", how)


def _idx_or_torchvision(
    opts: MnistOptions, name: str, dirs: Sequence[str], classes: list[str], tv_class: str, how: str
) -> ImageDataset:
    found = find_idx(dirs)
    if found is not None:
        splits = [_read_split(found, split) for split in ("train", "t10k")]
    else:
        import torchvision.datasets as tvd

        make = getattr(tvd, tv_class)
        root, download = data_root(opts), opts.download
        splits = []
        for train in (True, False):
            ds = open_or_unavailable(lambda: make(root, train=train, download=download), name, dirs, download, how)
            splits.append((ds.data.unsqueeze(1).contiguous(), ds.targets.long()))
    (x_train, y_train), (x_test, y_test) = splits
    return ImageDataset(name, x_train, y_train, x_test, y_test, list(classes))


def _read_split(directory: str, split: str) -> tuple[torch.Tensor, torch.Tensor]:
    x = read_idx(idx_path(directory, split, "images-idx3"))  # (N, 28, 28)
    y = read_idx(idx_path(directory, split, "labels-idx1"))  # (N,)
    if len(x) != len(y):
        raise DatasetUnavailable(f"{directory}: {split} images ({len(x)}) and labels ({len(y)}) differ in length")
    # copy: np.frombuffer arrays are read-only, and torch wants writable memory
    return torch.from_numpy(x.copy()).unsqueeze(1), torch.from_numpy(y.astype(np.int64))
