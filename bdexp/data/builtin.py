"""`digits`: scikit-learn's bundled 8×8 handwritten digits — the default dataset, no download.

Source: sklearn.datasets.load_digits (the UCI "Optical Recognition of Handwritten Digits" test
set, 1797 images, pixel values 0..16). There is no official split, so a fixed, seeded,
stratified 80/20 split is drawn with `split_seed`; it does not move with the run seed.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from bdexp.data.base import DATASETS, Channels, DataOptions, DigitAugment, ImageDataset
from bdexp.options import option


@dataclass(frozen=True)
class DigitsOptions(DataOptions):
    image_size: int = option(16, lo=8)  # native 8; 16 leaves room for 3×3 triggers
    channels: Channels = 1
    split_seed: int = option(0, lo=0, hi=2**32 - 1)  # the fixed split; independent of the run seed
    test_fraction: float = option(0.2, lo=0, hi=1, lo_open=True, hi_open=True)
    augment: DigitAugment = DigitAugment()


@DATASETS.register("digits", options=DigitsOptions)
def digits(opts: DigitsOptions) -> ImageDataset:
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    bunch = load_digits()
    # 0..16 (4-bit counts of a 4×4 block of the 32×32 bitmap) -> 0..255.
    x = np.round(bunch.images * (255.0 / 16.0)).astype(np.uint8)[:, None]  # (1797, 1, 8, 8)
    y = bunch.target.astype(np.int64)
    train, test = train_test_split(
        np.arange(len(y)),
        test_size=opts.test_fraction,
        stratify=y,
        random_state=opts.split_seed,
    )
    train, test = np.sort(train), np.sort(test)
    return ImageDataset(
        name="digits",
        x_train=torch.from_numpy(x[train]),
        y_train=torch.from_numpy(y[train]),
        x_test=torch.from_numpy(x[test]),
        y_test=torch.from_numpy(y[test]),
        classes=[str(i) for i in range(10)],
    )
