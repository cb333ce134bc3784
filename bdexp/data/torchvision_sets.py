"""Datasets fetched and parsed by torchvision: `cifar10`, `gtsrb`, `celeba8`, `imagenette`.

Each reads `root` (torchvision's own layout below it) and downloads there when `download` is
true. Anything that goes wrong finding or fetching the files becomes one DatasetUnavailable
naming the directories looked in and how to get the data (see common.open_or_unavailable).
Image files are decoded once, resized to `image_size` on the way (common.FitSquare), and the
result is cached on disk by `load_dataset`.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Literal

import torch

from bdexp.data.base import DATASETS, Augment, DownloadOptions, Fit, ImageDataset
from bdexp.data.common import FitSquare, cache_on_disk, data_root, decode_all, open_or_unavailable
from bdexp.errors import ConfigError, DatasetUnavailable
from bdexp.options import option

NETWORK = "or run with network access and dataset.download=true"


@dataclass(frozen=True)
class FittedOptions(DownloadOptions):
    """A source of image files of any size, squared while decoding (common.FitSquare)."""

    fit: Fit = "stretch"


def _fit(opts: FittedOptions) -> FitSquare:
    return FitSquare(opts.image_size, opts.channels, opts.fit)


@DATASETS.register("cifar10", options=DownloadOptions)
@cache_on_disk(files=lambda opts: [os.path.join(data_root(opts), "cifar-10-batches-py")])
def cifar10(opts: DownloadOptions) -> ImageDataset:
    """CIFAR-10 (Krizhevsky 2009): 50000 / 10000 images, 32×32 RGB, stored as pickled arrays."""
    from torchvision.datasets import CIFAR10

    root, download = data_root(opts), opts.download
    where = [os.path.join(root, "cifar-10-batches-py")]
    how = f"Set dataset.root=/path/to/data to a directory containing cifar-10-batches-py, {NETWORK}."
    splits = []
    for train in (True, False):
        ds = open_or_unavailable(lambda: CIFAR10(root, train=train, download=download), "cifar10", where, download, how)
        x = torch.from_numpy(ds.data).permute(0, 3, 1, 2).contiguous()  # NHWC -> NCHW
        splits += [x, torch.as_tensor(ds.targets, dtype=torch.int64)]
    return ImageDataset("cifar10", *splits, list(ds.classes))


# The 43 GTSRB class ids in order (the benchmark's signnames; Stallkamp et al. 2012).
GTSRB_CLASSES = [
    "Speed limit (20km/h)", "Speed limit (30km/h)", "Speed limit (50km/h)", "Speed limit (60km/h)",
    "Speed limit (70km/h)", "Speed limit (80km/h)", "End of speed limit (80km/h)",
    "Speed limit (100km/h)", "Speed limit (120km/h)", "No passing",
    "No passing for vehicles over 3.5 metric tons", "Right-of-way at the next intersection",
    "Priority road", "Yield", "Stop", "No vehicles", "Vehicles over 3.5 metric tons prohibited",
    "No entry", "General caution", "Dangerous curve to the left", "Dangerous curve to the right",
    "Double curve", "Bumpy road", "Slippery road", "Road narrows on the right", "Road work",
    "Traffic signals", "Pedestrians", "Children crossing", "Bicycles crossing",
    "Beware of ice/snow", "Wild animals crossing", "End of all speed and passing limits",
    "Turn right ahead", "Turn left ahead", "Ahead only", "Go straight or right",
    "Go straight or left", "Keep right", "Keep left", "Roundabout mandatory", "End of no passing",
    "End of no passing by vehicles over 3.5 metric tons",
]


@dataclass(frozen=True)
class SignAugment(Augment):
    """No flip: mirroring changes a sign's meaning (turn left / turn right)."""

    flip: bool = False


@dataclass(frozen=True)
class GtsrbOptions(FittedOptions):
    augment: SignAugment = SignAugment()


@DATASETS.register("gtsrb", options=GtsrbOptions)
@cache_on_disk(files=lambda opts: [os.path.join(data_root(opts), "gtsrb")])
def gtsrb(opts: GtsrbOptions) -> ImageDataset:
    """GTSRB: 39209 / 12630 traffic-sign crops of 15×15 to 250×250 px, 43 classes."""
    from torchvision.datasets import GTSRB

    root, download = data_root(opts), opts.download
    base = os.path.join(root, "gtsrb")
    where = [os.path.join(base, "GTSRB", "Training"), os.path.join(base, "GTSRB", "Final_Test", "Images")]
    how = (
        f"Set dataset.root to a directory containing gtsrb/GTSRB/Training, gtsrb/GTSRB/Final_Test/Images "
        f"and gtsrb/GT-final_test.csv (torchvision's layout), {NETWORK}."
    )
    fit = _fit(opts)
    splits = []
    for split in ("train", "test"):
        ds = open_or_unavailable(
            lambda: GTSRB(root, split=split, transform=fit, download=download), "gtsrb", where, download, how
        )
        if split == "train":
            # torchvision numbers the training folders 00000..00042 by sorted position, so a
            # partial copy would silently shift labels: insist on all 43.
            n_folders = sum(e.is_dir() for e in os.scandir(where[0]))
            if n_folders != len(GTSRB_CLASSES):
                raise DatasetUnavailable(
                    f"dataset 'gtsrb': {where[0]} has {n_folders} class folders, expected 43 "
                    f"(incomplete copy?). {how}"
                )
        splits += decode_all(len(ds), ds.__getitem__, f"gtsrb {split}")
    return ImageDataset("gtsrb", *splits, list(GTSRB_CLASSES))


@dataclass(frozen=True)
class Celeba8Options(FittedOptions):
    image_size: int = option(64, lo=8)  # WaNet resizes CelebA to 64×64
    # The three binary attributes whose bits make the label, most significant first (_attribute_code).
    attributes: tuple[str, ...] = option(["Heavy_Makeup", "Mouth_Slightly_Open", "Smiling"])


@DATASETS.register("celeba8", options=Celeba8Options)
@cache_on_disk(files=lambda opts: [os.path.join(data_root(opts), "celeba")])
def celeba8(opts: Celeba8Options) -> ImageDataset:
    """CelebA faces, 8 classes from three binary attributes read as a 3-bit number (ML-MMDR §3.4).

    The official partition: train (162770) for training, test (19962) for testing.
    """
    from torchvision.datasets import CelebA

    root, download = data_root(opts), opts.download
    attrs = list(opts.attributes)
    where = [os.path.join(root, "celeba")]
    how = (
        "torchvision's Google-Drive download is often refused (quota), so download it by hand from "
        "https://mmlab.ie.cuhk.edu.hk/projects/CelebA.html (Align&Cropped images): unzip "
        f"img_align_celeba.zip into {where[0]}/img_align_celeba and put list_attr_celeba.txt, "
        "identity_CelebA.txt, list_bbox_celeba.txt, list_landmarks_align_celeba.txt and "
        f"list_eval_partition.txt in {where[0]} (or set dataset.root to where a celeba/ folder is)."
    )
    fit = _fit(opts)
    splits = []
    for split in ("train", "test"):
        ds = open_or_unavailable(
            lambda: CelebA(root, split=split, target_type="attr", transform=fit, download=download),
            "celeba8", where, download, how,
        )
        labels = _attribute_code(ds.attr, list(ds.attr_names), attrs)
        x, _ = decode_all(len(ds), lambda i: (ds[i][0], 0), f"celeba8 {split}")
        splits += [x, labels]
    return ImageDataset("celeba8", *splits, _code_names(attrs))


def _attribute_code(attr: torch.Tensor, names: list[str], chosen: list[str]) -> torch.Tensor:
    """Label = binary number of the chosen attributes, the first the most significant bit.

    WaNet's CelebA_attr loader reads attribute indices 18, 31, 21, i.e. (Heavy_Makeup, Smiling,
    Mouth_Slightly_Open), which ML-MMDR follows via its refs [29], [34]; conf/dataset/celeba8.yaml
    lists the same three attributes in ML-MMDR §3.4's order (Heavy_Makeup, Mouth_Slightly_Open,
    Smiling), which swaps the two low bits: the classes are the same, numbered differently.
    """
    unknown = [a for a in chosen if a not in names]
    if unknown:
        raise ConfigError(f"dataset.attributes: unknown CelebA attribute(s) {unknown}; choose from {names}")
    bits = attr[:, [names.index(a) for a in chosen]].long()  # torchvision maps {-1, 1} -> {0, 1}
    weights = 2 ** torch.arange(len(chosen) - 1, -1, -1)
    return (bits * weights).sum(1)


def _code_names(attrs: list[str]) -> list[str]:
    """Class names such as 'Heavy_Makeup+Smiling' (code 6) or 'none' (code 0)."""
    names = []
    for code in range(2 ** len(attrs)):
        on = [a for j, a in enumerate(attrs) if code >> (len(attrs) - 1 - j) & 1]
        names.append("+".join(on) or "none")
    return names


# torchvision's Imagenette variant (shorter side) -> the folder it unpacks to
IMAGENETTE_FOLDERS = {"160px": "imagenette2-160", "320px": "imagenette2-320", "full": "imagenette2"}


@dataclass(frozen=True)
class ImagenetteOptions(FittedOptions):
    size: Literal["160px", "320px", "full"] = "160px"  # torchvision variant: IMAGENETTE_FOLDERS
    image_size: int = option(64, lo=8)
    fit: Fit = "center_crop"  # keep the aspect ratio, take the central square


@DATASETS.register("imagenette", options=ImagenetteOptions)
@cache_on_disk(files=lambda opts: [os.path.join(data_root(opts), IMAGENETTE_FOLDERS[opts.size])])
def imagenette(opts: ImagenetteOptions) -> ImageDataset:
    """Imagenette (fast.ai): 10 easy ImageNet classes, 9469 train / 3925 val; val is our test."""
    from torchvision.datasets import Imagenette

    root, download = data_root(opts), opts.download
    size = opts.size
    folder = IMAGENETTE_FOLDERS[size]
    where = [os.path.join(root, folder)]
    how = f"Set dataset.root to a directory containing {folder}/{{train,val}}, {NETWORK}."
    fit = _fit(opts)
    splits = []
    for split in ("train", "val"):
        ds = open_or_unavailable(
            lambda: Imagenette(root, split=split, size=size, transform=fit, download=download),
            "imagenette", where, download, how,
        )
        splits += decode_all(len(ds), ds.__getitem__, f"imagenette {split}")
    classes = [c[0] if isinstance(c, tuple) else str(c) for c in ds.classes]  # ('tench', 'Tinca tinca')
    return ImageDataset("imagenette", *splits, classes)
